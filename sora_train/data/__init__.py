"""Streaming latent shards, packed into fixed token budgets, with a global resumable position."""

from .decode import BadSample
from .loader import DataQualityError, PackedLoader
from .packing import PackedBatch, Packer, unpack
from .patchify import patchify, unpatchify
from .position import StreamPosition
from .shards import ManifestMismatch, check_manifest, list_shards, load_manifest
from .stream import StreamSpec

__all__ = ["BadSample", "DataQualityError", "PackedLoader", "PackedBatch", "Packer", "unpack", "patchify",
           "unpatchify", "StreamPosition", "ManifestMismatch", "check_manifest", "list_shards", "load_manifest", "StreamSpec"]
