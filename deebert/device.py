"""Where the model runs and in which number format: `--device auto|cpu|cuda`, `--dtype fp32|bf16|fp16`."""

import torch

from deebert.errors import DeeBertError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeeBertError(f"--device {name} asked for a GPU, but torch sees none; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise DeeBertError(f"--device {name} is not one of auto, cpu, cuda")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 everywhere; bf16 and fp16 on a GPU (on a CPU they are slower than fp32 and less exact)."""
    if name not in DTYPES:
        raise DeeBertError(f"--dtype {name} is not one of {', '.join(DTYPES)}")
    if name != "fp32" and device.type != "cuda":
        raise DeeBertError(f"--dtype {name} needs a GPU; use --dtype fp32 on the CPU")
    return DTYPES[name]
