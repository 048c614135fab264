"""Backend registry: which implementations exist, which are usable, and why not.

A backend is a module with ``rows_forward``, ``symmetric_grad``, ``is_available``
and ``why_unavailable`` (interface documented in ``backends/torch.py``).
"""
from __future__ import annotations

import importlib
from typing import Dict, List

import torch as _torch

__all__ = ["BACKEND_NAMES", "get_backend", "available_backends", "backend_status", "resolve_backend"]

# Preference order for backend="auto" on CUDA; "torch" is the universal fallback.
BACKEND_NAMES = ("triton", "ext", "torch")
_MODULES = {"triton": ".triton", "ext": ".ext", "torch": ".torch"}
_LOADED: Dict[str, object] = {}  # get_backend runs at every step: skip importlib after the first


def get_backend(name: str):
    """Import and return the backend module called ``name``."""
    mod = _LOADED.get(name)
    if mod is None:
        if name not in _MODULES:
            raise ValueError(f"backend: unknown value {name!r}; valid values are auto, {', '.join(BACKEND_NAMES)}")
        mod = _LOADED[name] = importlib.import_module(_MODULES[name], __name__)
    return mod


_STATUS_CACHE: Dict[str, tuple] = {}


def _status(name: str):
    """(available, reason) of a backend; computed once per process (availability is static)."""
    if name not in _STATUS_CACHE:
        _STATUS_CACHE[name] = _compute_status(name)
    return _STATUS_CACHE[name]


def _compute_status(name: str):
    try:
        mod = get_backend(name)
    except Exception as exc:  # a backend module that fails to import is simply unavailable
        return False, f"import failed: {exc!r}"
    reason = mod.why_unavailable()
    return (not reason), reason


def backend_status() -> Dict[str, Dict[str, object]]:
    """Each backend's availability in this process and, when unavailable, why."""
    out = {}
    for name in BACKEND_NAMES:
        ok, reason = _status(name)
        out[name] = {"available": ok, "reason": reason or "ok"}
    return out


def available_backends() -> List[str]:
    """Names of the backends usable in this process, e.g. ``["triton", "torch"]``."""
    return [name for name in BACKEND_NAMES if _status(name)[0]]


def resolve_backend(name: str, device: _torch.device, dtype: _torch.dtype) -> str:
    """Pick the concrete backend for ``backend=name`` on tensors of ``device``/``dtype``.

    Imports nothing (the triton status is computed when this package is imported), so
    torch.compile traces it without a graph break.
    """
    if name != "auto":
        if name not in _MODULES:
            raise ValueError(f"backend: unknown value {name!r}; valid values are auto, {', '.join(BACKEND_NAMES)}")
        return name
    if device.type == "cuda" and dtype != _torch.float64 and _status("triton")[0]:
        return "triton"
    return "torch"


# Whether "auto" may pick triton is decided once, at import, outside any traced code.
_status("triton")
