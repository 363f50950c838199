"""SVD-LLM (Wang et al. 2024): whiten the input side by the Cholesky factor of ``sum x x^T``."""

from dataclasses import dataclass

from .base import Method, Weights


@dataclass
class SVDLLM(Method):
    damping: float = 1e-6

    name = "svdllm"
    label = "SVD-LLM"
    color = "#8c564b"
    loss_units = False
    explorer_default = False
    requires = ("inputs",)
    description = "Truncation-aware whitening by the input Gram: minimises the output error ||dW X||."

    def weights(self, stats) -> Weights:
        return Weights(None, stats.input_gram, self.damping)
