"""Writes a randomly initialised BERT text encoder to a directory, loadable as `--text-encoder DIR`.

For machines without the MiniLM package (the GPU check carries no 90 MB of weights): the same width (384)
and interface as MiniLM, captions tokenised into letters, no meaning. Shapes and code paths, not quality.
  python -m data_tools.tiny_text_encoder OUT_DIR [--width 384]
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path


def write(out: str | Path, width: int = 384, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *string.punctuation]
    BertTokenizerFast(vocab={v: i for i, v in enumerate(vocab)}, do_lower_case=True).save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=width, num_hidden_layers=1, num_attention_heads=width // 64,
                        intermediate_size=2 * width, max_position_embeddings=256)
    BertModel(config).save_pretrained(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="directory to write (config, weights, tokenizer)")
    p.add_argument("--width", type=int, default=384, help="hidden size: the model's text_dim (MiniLM: 384)")
    a = p.parse_args(argv)
    print(write(a.out, a.width))


if __name__ == "__main__":
    main()
