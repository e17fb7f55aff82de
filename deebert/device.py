"""Where the model runs and in which number format: `--device auto|cpu|cuda|cuda:N`, `--dtype fp32|bf16|fp16`.
The one parser of both flags, so that a bad name, or a GPU that is not there, is one line of error before any work."""

import re

import torch

from deebert.errors import DeeBertError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA when a GPU is visible, else the CPU; cuda or cuda:N only when that GPU exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if not match:
        raise DeeBertError(f"--device {name} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match.group(1) or 0)
        if index >= count:
            raise DeeBertError(f"--device {name} asked for GPU {index}, but torch sees {count} GPU(s); use --device cpu or auto")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 everywhere; bf16 and fp16 on a GPU (on a CPU they are slower than fp32 and less exact)."""
    if name != "fp32" and device.type != "cuda":
        raise DeeBertError(f"--dtype {name} needs a GPU; use --dtype fp32 on the CPU")
    return DTYPES[name]
