"""Every collective the trainer's own code issues, recorded: its caller, function and tensors' devices.

usage: torchrun --nproc_per_node N tests/dist/collective_devices.py OUT_JSON POISON_STEP key=value ...
NCCL serves only CUDA tensors, so a tensor the trainer hands torch.distributed must be on the training
device, and must be built where the device is known: parallel/collectives.py (the agreed values),
parallel/ulysses.py and engine/ema.py (tensors derived from the model's own). On gloo every tensor is on
the CPU, so the device alone cannot tell a CPU-built tensor from a device one here; the caller can.
DeepSpeed's collectives (called from deepspeed/) are its own business and are not recorded.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
from faults import train_poisoned  # noqa: E402  (beside this file)

PACKAGE = Path(__import__("sora_train").__file__).parent
RECORDS: list[dict] = []


def tensors_in(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def spy(name: str):
    real = getattr(dist, name)

    def wrapped(*args, **kwargs):
        caller = sys._getframe(1)
        path = Path(caller.f_code.co_filename).resolve()
        if PACKAGE in path.parents:  # issued by sora_train itself, not by DeepSpeed or torch
            RECORDS.append({"fn": name, "caller": f"{path.relative_to(PACKAGE)}:{caller.f_lineno}",
                            "devices": sorted({str(t.device) for t in tensors_in([*args, *kwargs.values()])})})
        return real(*args, **kwargs)

    setattr(dist, name, wrapped)


def main():
    out, poison = sys.argv[1], int(sys.argv[2])
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                 "all_to_all_single", "reduce"):
        spy(name)
    trainer = train_poisoned({poison}, sys.argv[3:])  # tests/dist/faults.py
    if trainer.dims.is_main:
        Path(out).write_text(json.dumps({"device": str(trainer.device), "records": RECORDS}))
    trainer.close()


if __name__ == "__main__":
    main()
