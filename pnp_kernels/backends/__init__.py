"""Backend registry: which implementations exist, which are usable here, and why not.

A backend is an instance of a :class:`~pnp_kernels.backends.base.Backend`
subclass; its module is imported on first use and the instance is cached.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple

import torch as _torch

from .base import Backend

__all__ = ["Backend", "BACKEND_NAMES", "get_backend", "available_backends", "backend_status", "resolve_backend"]

# Preference order for backend="auto"; "torch" is the universal fallback.
BACKEND_NAMES = ("triton", "ext", "torch")
_CLASSES = {
    "triton": (".triton_backend", "TritonBackend"),
    "ext": (".ext_backend", "ExtBackend"),
    "torch": (".torch_backend", "TorchBackend"),
}
_LOADED: Dict[str, Backend] = {}  # get_backend runs at every step: import once
_STATUS: Dict[str, Tuple[bool, str]] = {}


def _unknown(name) -> ValueError:
    return ValueError(f"backend: unknown value {name!r}; valid values are auto, {', '.join(BACKEND_NAMES)}")


def get_backend(name: str) -> Backend:
    """The backend instance called ``name`` (imported on first use)."""
    impl = _LOADED.get(name)
    if impl is None:
        if name not in _CLASSES:
            raise _unknown(name)
        module, cls = _CLASSES[name]
        impl = _LOADED[name] = getattr(importlib.import_module(module, __name__), cls)()
    return impl


def _status(name: str) -> Tuple[bool, str]:
    """(available, one-line reason) of a backend; computed once per process."""
    if name not in _STATUS:
        try:
            reason = get_backend(name).why_unavailable()
        except Exception as exc:  # a backend module that fails to import is unavailable
            reason = f"import failed: {exc!r}"
        _STATUS[name] = (not reason, reason.strip().splitlines()[0] if reason else "")
    return _STATUS[name]


def backend_status() -> Dict[str, Dict[str, Any]]:
    """Each backend's availability in this process and, when unavailable, a one-line
    reason (for ext, with the path of the full build log)."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in BACKEND_NAMES:
        ok, reason = _status(name)
        out[name] = {"available": ok, "reason": reason or "ok"}
    return out


def available_backends() -> List[str]:
    """Names of the backends usable in this process, e.g. ``["triton", "torch"]``."""
    return [name for name in BACKEND_NAMES if _status(name)[0]]


def resolve_backend(name: str, device: _torch.device, dtype: _torch.dtype) -> Backend:
    """The backend for ``backend=name`` on tensors of ``device``/``dtype``.

    "auto" takes the first backend, in ``BACKEND_NAMES`` order, that declares the
    device type among its ``auto_devices``, computes in that dtype and is available;
    it never triggers a compiler run (ext declares no auto device). Imports nothing
    new after the first call, so torch.compile traces it without a graph break.
    """
    if name != "auto":
        if name not in _CLASSES:
            raise _unknown(name)
        return get_backend(name)
    cdt = Backend.compute_dtype(dtype)
    for candidate in BACKEND_NAMES:
        try:
            impl = get_backend(candidate)
        except ImportError:  # its module does not import here (backend_status says why)
            continue
        if device.type in impl.auto_devices and cdt in impl.compute_dtypes and _status(candidate)[0]:
            return impl
    return get_backend("torch")


# Every backend class is loaded (none builds anything) and whether "auto" may pick
# triton is decided once, at import, outside any traced code: resolve_backend then
# imports nothing, so torch.compile traces it without a graph break.
for _name in BACKEND_NAMES:
    try:
        get_backend(_name)
    except ImportError:
        pass
_status("triton")
