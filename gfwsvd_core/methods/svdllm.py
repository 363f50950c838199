"""SVD-LLM (Wang et al. 2024): whiten the input side by a root of ``sum x x^T``; and SVD-LLM V2.

V2 (Wang et al. 2025) keeps the same optimum with a symmetric eigen-root whose small eigenvalues
are floored (robust when the Gram is singular) and gives each matrix its own kept ratio from its
truncation loss, grouped by matrix type (``allocation="v2"``).
"""

from dataclasses import dataclass, field

from ..errors import ConfigurationError
from ..fisher.psd import ROOT_KINDS
from .base import Method, Weights


@dataclass
class SVDLLM(Method):
    damping: float = 1e-6
    #: "cholesky" (SVD-LLM: Cholesky of the damped Gram) or "eigen" (V2: floored eigen-root)
    root: str = "cholesky"

    name = "svdllm"
    label = "SVD-LLM"
    color = "#8c564b"
    loss_units = False
    explorer_default = False
    requires = ("inputs",)
    description = "Truncation-aware whitening by the input Gram: minimises the output error ||dW X||."

    def __post_init__(self):
        super().__post_init__()
        if self.root not in ROOT_KINDS:
            raise ConfigurationError(f"{self.label} root must be one of {', '.join(ROOT_KINDS)}, got {self.root!r}")

    def weights(self, stats) -> Weights:
        return Weights(None, stats.input_gram, self.damping, root=self.root)


@dataclass
class SVDLLMV2(SVDLLM):
    root: str = "eigen"
    allocation: str = field(default="v2", kw_only=True)

    name = "svdllm2"
    label = "SVD-LLM V2"
    auto_candidate = False  # its truncation is SVD-LLM's optimum; only its ranks differ
    color = "#c49c94"
    description = ("SVD-LLM's whitening by a floored eigen-root of the input Gram, with per-matrix kept ratios "
                   "from each matrix's truncation loss (grouped by matrix type).")
