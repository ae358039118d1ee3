"""One check of a requested torch device, shared by every command that takes ``--device``
(``pgolf train`` through its config's ``device``, ``pgolf quantize``, ``pgolf eval``, ``pgolf run``).

``check_device("cuda")`` on a CPU-only torch is a :class:`ValueError` that says so
(``--device cuda: no CUDA device available (torch 2.x+cpu is built without CUDA)``), raised
before any data is read, instead of torch's ``AssertionError`` from deep inside the first
``.to(device)``.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["check_device", "cuda_unavailable_reason", "hopper_kernels_unavailable"]


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here (None when it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is built without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda or torch.version.hip}) finds no GPU"


def hopper_kernels_unavailable(device: torch.device | str | None, what: str, load: Callable[[], object],
                               package: str) -> str | None:
    """Why optional Hopper kernels (``what``, from pip ``package``) cannot run on ``device`` (a torch
    device or its name; None = the current CUDA device), or None when they can: CUDA, sm90 or newer,
    and ``load()`` (the import of the package) succeeding."""
    import torch

    why = cuda_unavailable_reason()
    if why is not None:
        return f"no CUDA device ({why})"
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return f"device {dev} is not CUDA"
    major, _ = torch.cuda.get_device_capability(dev)
    if major < 9:
        return f"{what} need Hopper (sm90) or newer; this GPU is sm{major}x"
    try:
        load()
    except Exception as e:  # ImportError, or the CuTe DSL failing to load its libraries
        return f"{package} is not importable ({type(e).__name__}: {e}); pip install {package}"
    return None


def check_device(spec: str, flag: str = "--device") -> str:
    """``spec`` ("cpu", "cuda" or "cuda:N") when this machine can run on it; else a ValueError
    naming ``flag`` (the option, or the config key, the value came from) and what is wrong."""
    import torch

    text = str(spec).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {spec!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise ValueError(f"{flag} {spec!r}: unsupported device type {dev.type!r}; use cpu, cuda or cuda:N")
    why = cuda_unavailable_reason()
    if why is not None:
        hint = f"; use {flag} cpu" if flag.startswith("--") else f" (set {flag} = 'cpu' or 'auto')"
        raise ValueError(f"{flag} {text}: no CUDA device available ({why}){hint}")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"{flag} {text}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return text
