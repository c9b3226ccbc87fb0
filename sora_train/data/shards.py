"""Shard sources: a directory, a brace pattern, or `pipe:` commands, in one fixed order.

Trust boundary: a `pipe:` source runs its command in a shell. Sources come only from the run's
configuration (never from data), so whoever can edit the config can already run code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import braceexpand


def list_shards(sources: str | list[str]) -> list[str]:
    """Expands each source to shard URLs; the order is the source order, then sorted per directory."""
    urls: list[str] = []
    for source in [sources] if isinstance(sources, str) else list(sources):
        if source.startswith("pipe:") or "{" in source:
            urls.extend(braceexpand.braceexpand(source))
        elif Path(source).is_dir():
            found = sorted(str(p) for p in Path(source).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in {source}")
            urls.extend(found)
        elif Path(source).is_file():
            urls.append(source)
        else:
            raise FileNotFoundError(f"shard source {source!r} is not a directory, file, brace pattern or pipe: URL")
    if not urls:
        raise FileNotFoundError(f"no shards found in {sources!r}")
    return urls


def fingerprint(urls: list[str], manifest: dict | None = None) -> str:
    """Identity of a dataset, for resume. With a manifest: each shard's name and content (its sha256, written by
    sora-encode; older manifests: its sample and token counts), so a different dataset with the same shard names
    (every encode names its shards shard-000000.tar, ...) is told apart. Without one (pipe: sources): the names.
    Names without their directory, so a dataset moved to another mount still matches."""
    names = [u.rsplit("/", 1)[-1].split()[-1] if not u.startswith("pipe:") else u for u in urls]
    if manifest is None:
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    content = {s["shard"]: s.get("sha256") or [s.get("samples"), s.get("tokens")] for s in manifest.get("shards", [])}
    return hashlib.sha256(json.dumps([[n, content.get(n)] for n in names]).encode()).hexdigest()[:16]


def load_manifest(sources: str | list[str]) -> dict | None:
    """manifest.json beside the shards of the first local source, if there is one."""
    first = sources if isinstance(sources, str) else sources[0]
    if first.startswith("pipe:"):
        return None
    base = Path(first) if Path(first).is_dir() else Path(first.split("{")[0]).parent
    path = base / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


class ManifestMismatch(ValueError):
    """The shards were encoded for a different model (channels, text width, patch)."""


def check_manifest(manifest: dict, channels: int, text_dim: int, patch: tuple[int, int, int],
                   text_len: int | None = None) -> None:
    """Refuses data that does not fit the model (or a row's text budget `text_len`), before any step runs; names the
    key to fix."""
    problems = []
    longest = manifest.get("max_text_tokens", 0)  # manifests from before the count: not checked
    if text_len is not None and longest > text_len:
        problems.append(f"captions: the longest has {longest} tokens, data.text_len={text_len} (the text tokens of "
                        f"a packed row) would cut it; set data.text_len>={longest}")
    have_c = manifest["codec"]["latent_channels"]
    if have_c != channels:
        problems.append(f"latent channels: shards have {have_c} ({manifest['codec']['name']}), "
                        f"model.in_channels={channels}")
    have_d = manifest["text_encoder"]["width"]
    if have_d != text_dim:
        problems.append(f"text width: shards have {have_d} ({manifest['text_encoder']['name']}), model.text_dim={text_dim}")
    snapped = manifest.get("patch_size", [1, 1, 1])
    if any(s % p for s, p in zip(snapped, patch)):
        problems.append(f"patch size: shards were snapped to multiples of {snapped}, model.patch_size={list(patch)} "
                        "does not divide them")
    if problems:
        raise ManifestMismatch("the dataset does not match the model: " + "; ".join(problems))


def dataset_changes(old_data: dict, new_data: dict) -> str:
    """What differs between the datasets of a checkpoint's data config and this run's, from their manifests shard by
    shard (and the encoder's settings): the detail of a refused resume. '' where neither manifest can be read."""
    if new_data.get("sources"):
        old_sources = old_data.get("sources") or {}
        pairs = [(f"data.sources.{k}", (old_sources.get(k) or {}).get("train"), (v or {}).get("train"))
                 for k, v in new_data["sources"].items()]
    else:
        pairs = [("data.train", old_data.get("train"), new_data.get("train"))]
    found = []
    for key, old, new in pairs:
        if not isinstance(old, str) or not isinstance(new, str) or old.startswith("pipe:") or new.startswith("pipe:"):
            continue
        before, now = load_manifest(old), load_manifest(new)
        if before is None or now is None:
            found.append(f"{key}: the checkpoint's {old} has no manifest.json to compare" if before is None else "")
            continue
        a = {s["shard"]: s.get("sha256") for s in before.get("shards", [])}
        b = {s["shard"]: s.get("sha256") for s in now.get("shards", [])}
        differ = sorted(n for n in a.keys() & b.keys() if a[n] != b[n])
        what = [f"{len(differ)} of {len(a)} shards with other contents ({', '.join(differ[:3])}"
                f"{', ...' if len(differ) > 3 else ''})"] if differ else []
        for label, names in (("only in the checkpoint's", a.keys() - b.keys()), ("only in this run's", b.keys() - a.keys())):
            if names:
                what.append(f"{len(names)} shards {label} ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''})")
        settings = sorted(k for k in set(before.get("policy", {})) | set(now.get("policy", {}))
                          if before.get("policy", {}).get(k) != now.get("policy", {}).get(k))
        settings += [k for k in ("codec", "text_encoder") if before.get(k) != now.get(k)]
        if settings:
            what.append(f"encoded with other settings ({', '.join(settings)})")
        if what:
            found.append(f"{key}: {old} -> {new}: {'; '.join(what)}")
    return "; ".join(f for f in found if f)
