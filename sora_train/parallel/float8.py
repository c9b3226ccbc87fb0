"""Float8 training of the blocks' token-wide linear layers (torchao's Float8Linear), `parallel.float8`.

Which layers: those whose input is every token of the packed rows (self-attention's qkv and output, the
cross-attention's query and output, the MLP): they are ~all of the model's FLOPs. Left in bf16: the per-sample
layers (adaLN modulation, timestep and text embedders: a few rows each, where a float8 cast costs more than it
saves), the cross-attention's text keys and values, the patch embedding and the final projection (the
input and output of the network, where precision is kept by common practice: torchtitan, DeepSeek-V3).
torchao rather than our own casts: its scaling recipes, amax handling and the inductor-fusible casts are
maintained against cuBLAS/CUTLASS float8 kernels; ZeRO-3 needs nothing special because Float8Linear keeps the
same bf16 `weight` and `bias` Parameters (ZeRO's partitioned ones) and casts them in forward."""

from __future__ import annotations

from torch import nn

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")  # parallel.float8 (torchao's Float8LinearRecipeName values)
FLOAT8_LAYERS = ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.proj", "mlp.fc1", "mlp.fc2")  # in each block


def float8_available() -> str | None:
    """None if torchao's float8 training imports here, else why not (for the config check)."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"torchao is not installed ({e}); pip install 'sora_train[fp8]'"
    return None


def convert_to_float8(model: nn.Module, recipe: str) -> list[str]:
    """Swaps the blocks' token-wide linear layers for Float8Linear (in place; parameter names unchanged, so
    checkpoints load either way). Returns the swapped layers' names. Layers whose widths are not multiples of 16
    (what float8 GEMMs take) stay as they are."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"parallel.float8={recipe!r}: use {', '.join(FLOAT8_RECIPES)}")
    if recipe == "none":
        return []
    why = float8_available()
    if why:
        raise RuntimeError(f"parallel.float8={recipe}: {why}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    swapped = []

    def chosen(module: nn.Module, name: str) -> bool:
        parts = name.split(".")
        ok = (isinstance(module, nn.Linear) and parts[0] == "blocks" and ".".join(parts[2:]) in FLOAT8_LAYERS
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        if ok:
            swapped.append(name)
        return ok

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=chosen)
    return swapped
