"""fastcon: supervised contrastive losses computed blockwise, without an N x N matrix."""

from . import functional
from .backends.blockwise import block_memory, get_block_memory, set_block_memory
from .modules import CLCELoss, FocalSupConLoss, SCHaNeLoss, SupConLoss
from .memory_bank import MemoryBank
from .gradcache import GradCache

__version__ = "0.1.0"

__all__ = [
    "SupConLoss",
    "SCHaNeLoss",
    "CLCELoss",
    "FocalSupConLoss",
    "MemoryBank",
    "GradCache",
    "functional",
    "set_block_memory",
    "get_block_memory",
    "block_memory",
    "__version__",
]
