"""Where the model runs, in which number format, and how a batch gets there.

`--device auto|cpu|cuda|cuda:N` and `--dtype`/`--amp auto|fp32|bf16|fp16` are parsed here, once, so that a bad
name, or a GPU that is not there, is one line of error before any work. `auto` takes a GPU when there is one and
bf16 on a GPU that has it; on the CPU everything is fp32.

The contract for batches, which every path follows (training, the full pass, early exit, the benchmark):
only the model's inputs go to the device (`model_inputs`); a batch's "index" and "labels" stay on the CPU, where
they index CPU tensors (the labels of a training batch go to the device separately, for the loss)."""

import re

import torch

from deebert.errors import DeeBertError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *DTYPES)
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


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
            raise DeeBertError(
                f"--device {name} asked for GPU {index}, but torch sees {count} GPU(s); use --device cpu or auto"
            )
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp32. bf16 and fp16 only on a GPU (on a CPU they are slower
    than fp32, and less exact)."""
    if name == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if name != "fp32" and device.type != "cuda":
        raise DeeBertError(f"{flag} {name} needs a GPU; on the CPU use {flag} auto (fp32)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in DTYPES.items() if known == dtype)


def use_tf32(device: torch.device, enabled: bool = True) -> None:
    """On CUDA, fp32 matrix products in TF32 (10-bit mantissa, several times faster on an A100/H100); the parity
    checks switch it off. Nothing changes on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matrix products in `dtype` inside the block, weights and their updates in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def model_inputs(batch: dict, device: torch.device) -> dict:
    """A batch (the tokenizer's dict) -> the model's three inputs, on `device`: {"input_ids", "token_type_ids",
    "attention_mask"}, the last two None where absent.

    Whether the batch is padded is decided here, on the CPU, before the copy: an attention mask of only ones
    becomes None, so that attention takes its fastest kernel and no forward has to ask the GPU (a sync). On CUDA
    the copies come from pinned memory and do not block. Nothing else of the batch is copied."""
    inputs = {key: batch.get(key) for key in MODEL_INPUTS}
    if inputs["attention_mask"] is not None and bool(inputs["attention_mask"].all()):
        inputs["attention_mask"] = None  # nothing is padded
    return {key: to_device(value, device) for key, value in inputs.items()}


def to_device(tensor, device: torch.device):
    """A CPU tensor (or None) on `device`; on CUDA through pinned memory, without waiting for the copy."""
    if tensor is None:
        return None
    if device.type == "cuda":  # pinned (page-locked) memory: the GPU copies it while the CPU goes on
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
