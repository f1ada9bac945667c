"""One definition per loss: its hyper-parameters, its dense form (the reference) and its
streaming form (tile statistics, merge, finalize, gradient tiles). See :mod:`.base`.

Every backend consumes these; adding a loss means one file here plus one branch in each
kernel language (``fastcon/backends/triton/kernels.py``, ``kernels/tile_math.h``).
"""

from .base import LSE, SUM, Counts, LossDefinition, RowTerms
from .focal import FocalSupCon
from .schane import SCHaNe
from .supcon import SupCon

DEFINITIONS = {d.name: d for d in (SupCon, SCHaNe, FocalSupCon)}


def definition(name: str, hyper) -> LossDefinition:
    """The definition ``name`` built from its hyper-parameters in field order (the inverse of
    :attr:`LossDefinition.hyper`; how custom ops rebuild a definition from plain arguments)."""
    return DEFINITIONS[name](*hyper)


__all__ = ["LSE", "SUM", "Counts", "LossDefinition", "RowTerms", "SupCon", "SCHaNe", "FocalSupCon",
           "DEFINITIONS", "definition"]
