"""Device and precision, decided in one place for every command: which device "auto" means, which
autocast dtype a precision name means on it, synchronizing for timing, CPU threads for a while, and a
readable name of the machine for result tables."""
from __future__ import annotations

import os
import platform
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Union

import torch

from ..errors import ConfigError

# Precision names a user can give (`--amp`): "auto" is bf16 (else fp16) on CUDA and full precision elsewhere.
AMP_MODES = ("auto", "none", "bf16", "fp16")
_ALIASES = {"fp32": "none"}


def resolve_device(spec: Union[str, torch.device, None] = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (or None) picks CUDA (this process's GPU under torchrun), then Apple MPS, then the CPU;
    an explicit device that is not available here is an error that says so."""
    if spec is None or str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(spec)!r} asked for but CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for but it is not available here; use --device cpu")
    return device


def amp_dtype(amp: Union[str, torch.dtype, None], device: Union[str, torch.device] = "cpu") -> Optional[torch.dtype]:
    """The autocast dtype for a precision name ("auto", "none"/"fp32", "bf16", "fp16") or a dtype on
    `device`; None means full precision."""
    if amp is None or isinstance(amp, torch.dtype):
        return None if amp in (None, torch.float32) else amp
    device = torch.device(device)
    name = _ALIASES.get(str(amp).lower(), str(amp).lower())
    if name not in AMP_MODES:
        raise ConfigError(f"unknown precision {amp!r}; choose one of {', '.join(AMP_MODES)}")
    if name == "none" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --amp fp16 (or none)")
    return torch.bfloat16 if name == "bf16" else torch.float16


def autocast(device: Union[str, torch.device], dtype: Optional[torch.dtype]):
    """torch.autocast on `device` in `dtype`, or nothing for full precision."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait for the GPU's queued work (timing needs it); nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def num_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` for the duration (None: unchanged)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_name(device: Union[str, torch.device]) -> str:
    """A readable name of the GPU or CPU, for result tables."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
