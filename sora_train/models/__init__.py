from .attention import VARLEN_KERNELS, build_attention
from .dit import DiT, DiTArgs, args_dict, count_params

__all__ = ["DiT", "DiTArgs", "args_dict", "count_params", "build_attention", "VARLEN_KERNELS"]
