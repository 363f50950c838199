"""Fisher approximations of a linear layer: diagonal, K-FAC and nearest Kronecker product."""

from .kronecker import KroneckerFactors, nearest_kronecker
from .psd import Root, root

__all__ = ["KroneckerFactors", "nearest_kronecker", "Root", "root"]
