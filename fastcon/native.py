"""Loader of the optional compiled CPU extension (built from ``kernels/``)."""

from __future__ import annotations

_ERROR = "the native extension has not been added to this build yet"


def is_available() -> bool:
    return False


def import_error() -> str:
    return _ERROR
