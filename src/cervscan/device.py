"""Device selection."""

from __future__ import annotations

import logging

from cervscan.errors import DeviceError

log = logging.getLogger(__name__)


def resolve_device(spec: str = "auto"):
    """Map ``auto|cpu|cuda|cuda:N|mps`` to a ``torch.device``; unavailable -> DeviceError."""
    import torch  # lazy: torch (batch and the model commands import this module)

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
        log.info("device auto -> %s", dev)
        return dev
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps' requested but not available")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{spec}' requested but CUDA is not available; use --device cpu or auto")
        if ":" in spec:
            try:
                idx = int(spec.split(":", 1)[1])
            except ValueError:
                raise DeviceError(f"bad device '{spec}'") from None
            if idx < 0 or idx >= torch.cuda.device_count():
                raise DeviceError(f"device '{spec}': only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(spec)
    raise DeviceError(f"unknown device '{spec}': use auto, cpu, cuda, cuda:N or mps")
