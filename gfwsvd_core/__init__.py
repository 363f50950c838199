"""gfwsvd_core: Fisher-weighted low-rank compression of transformer linear layers.

Data flows one way: load -> collect statistics -> estimate Fisher factors -> solve the weighted
SVD -> allocate ranks -> evaluate -> export.
"""

from .fisher import KroneckerFactors, nearest_kronecker
from .methods import available_methods, get_method
from .solver import decompose, weighted_svd
from .stats import LayerStats, collect_statistics, estimate_memory

__version__ = "0.1.0"

__all__ = [
    "KroneckerFactors",
    "LayerStats",
    "available_methods",
    "collect_statistics",
    "decompose",
    "estimate_memory",
    "get_method",
    "nearest_kronecker",
    "weighted_svd",
]
