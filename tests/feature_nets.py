"""Tiny random feature networks of the real kinds and formats, built and saved by the tests (nothing downloaded):
an I3D-shaped TorchScript file with StyleGAN-V's call, transformers VideoMAE, ViT and CLIP folders, and a torchvision
Inception-v3 state dict."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F


class TinyI3D(torch.nn.Module):
    """StyleGAN-V's i3d_torchscript.pt call: forward(x [N,3,T,H,W], rescale, resize, return_features)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 12, (3, 7, 7), stride=(2, 4, 4))
        self.logits = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        features = torch.relu(self.conv(x)).mean((2, 3, 4))
        return features if return_features else self.logits(features)


def i3d(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(str(path))
    return path


def videomae(path: Path) -> Path:
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(2)
    VideoMAEModel(VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 use_mean_pooling=True)).save_pretrained(str(path))
    return path


def clip(path: Path) -> Path:
    """A random CLIPModel with the MiniLM package's (BERT) tokenizer: the text tower's vocabulary is its size."""
    from transformers import CLIPConfig, CLIPModel

    from sora_train.codecs.text import minilm_path

    torch.manual_seed(2)  # a seed whose cosines fall on both sides of 0 (test_clipscore_...)
    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=101, eos_token_id=102, pad_token_id=0)  # BERT's ids
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(path))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path()) / name, path / name)
    return path


def inception(path: Path) -> Path:
    from torchvision.models import inception_v3

    torch.manual_seed(4)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), str(path))
    return path


def networks(root: Path) -> dict[str, str]:
    """The I3D, ViT and CLIP networks under root, as a MetricsConfig's keys."""
    root.mkdir(parents=True, exist_ok=True)
    return {"fvd_network": str(i3d(root / "i3d_torchscript.pt")), "fid_network": str(vit(root / "vit")),
            "clip_network": str(clip(root / "clip"))}
