"""Caption upsampling at sampling time (the DALL-E 3 / Sora recipe): a language model from a local directory rewrites
each short prompt into the detailed style of the training captions, through its own chat template."""

from __future__ import annotations

TEMPLATE = ("Rewrite this short video prompt as one detailed caption, in the style of a video dataset's captions: "
            "the main subject and its appearance, what it does and how it moves, the background, details, the "
            "visual style and the camera. Keep every fact of the prompt and invent nothing that contradicts it. "
            "Prompt: {prompt}")


def upsample(prompts: list[str], model_dir: str, template: str = TEMPLATE, max_new_tokens: int = 160) -> list[str]:
    """Greedy (reproducible) rewrites, one per prompt; an empty rewrite keeps the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pathlib import Path

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"upsample={model_dir}: not a local transformers model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok.padding_side = "left"  # generation continues the right end of every row
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": template.format(prompt=p)}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    inputs = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    rewrites = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [r.strip() or p for r, p in zip(rewrites, prompts)]
