"""Loader of the optional C++/CUDA extension (csrc/). Not built yet: always unavailable."""
from __future__ import annotations

__all__ = ["is_available", "why_unavailable"]


def is_available() -> bool:
    return False


def why_unavailable() -> str:
    return "the C++/CUDA extension is not part of this build yet"
