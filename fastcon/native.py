"""Whether fastcon's compiled CPU kernel is available: ``fastcon.native.is_available()``,
``fastcon.native.import_error()`` and ``fastcon.native.location()`` (the engine itself is
:mod:`fastcon.backends.native`)."""

from .backends.native import import_error, is_available, library_candidates, location

__all__ = ["is_available", "import_error", "location", "library_candidates"]
