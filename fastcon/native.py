"""Whether fastcon's compiled CPU kernel is available: ``fastcon.native.is_available()`` and
``fastcon.native.import_error()`` (the engine itself is :mod:`fastcon.backends.native`)."""

from .backends.native import import_error, is_available, library_candidates

__all__ = ["is_available", "import_error", "library_candidates"]
