"""Auto: per layer and rank, the candidate method whose truncation loses least on held-out samples.

No single weighting wins everywhere: the Fisher approximation that fits a layer best depends on
its shape, its gradients and the number of samples. Auto chooses per layer from one statistics
pass collected in two folds (even and odd calibration batches): every candidate is fitted on fold
A, and its truncation at each rank is scored by the exact empirical-Fisher quadratic on fold B,
``mean_{k in B} <G_k, W - W_r>^2 / 2`` (samples its weights never saw, so a method that merely
fits the calibration samples gains nothing). At rank r the layer uses the candidate with the
lowest held-out score, with its factors fitted on all samples. The per-rank minimum of the
held-out scores is Auto's loss curve: the budget allocation spends parameters on it, so ranks and
methods are chosen together under one global budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Optional

import torch

from ..errors import ConfigurationError
from .base import Method


@dataclass
class Auto(Method):
    #: the methods to choose among; empty: every registered method whose statistics were collected
    candidates: tuple = ()
    #: auto's curves are on one yardstick (the held-out quadratic): one global budget by default
    allocation: str = field(default="budget", kw_only=True)

    name = "auto"
    label = "Auto (per layer)"
    color = "#17becf"
    loss_units = True
    #: chosen from other methods' decompositions, not a weighting of its own
    composite: ClassVar[bool] = True
    requires = ("samples", "diagonal", "kfac", "inputs")
    description = "Per layer and rank, the method whose truncation loses least on held-out calibration samples."

    def __post_init__(self):
        from . import method_class

        super().__post_init__()
        if self.sequential:
            raise ConfigurationError("auto cannot compress sequentially (its choice needs the two folds of one "
                                     "statistics pass); use sequential=true with a single method")

        if isinstance(self.candidates, str):
            self.candidates = tuple(c.strip() for c in self.candidates.replace("+", ",").split(",") if c.strip())
        cands = tuple(method_class(c).name for c in self.candidates)
        if any(getattr(method_class(c), "composite", False) for c in cands):
            raise ConfigurationError("auto cannot choose among composite methods (auto itself)")
        self.candidates = tuple(dict.fromkeys(cands))

    def resolve(self, stats) -> tuple:
        """The candidates for these statistics: the given ones (each must have its statistics), or
        every registered non-composite method whose statistics were collected."""
        from . import available_methods, method_class
        from ..stats import has_kinds

        if self.candidates:
            lacking = {c: has_kinds(stats, method_class(c).requires) for c in self.candidates}
            lacking = {c: k for c, k in lacking.items() if k}
            if lacking:
                raise ConfigurationError(f"auto's candidates lack statistics: {lacking}; collect them again "
                                         "including these methods")
            return self.candidates
        return tuple(n for n in available_methods() if not getattr(method_class(n), "composite", False)
                     and method_class(n).auto_candidate and not has_kinds(stats, method_class(n).requires))

    def candidate(self, name: str) -> Method:
        """A candidate configured as auto is (the closed-form update passes on to every candidate)."""
        from . import get_method

        return get_method(name, update=self.update)

    def weights(self, stats):
        raise ConfigurationError("auto chooses among other methods' decompositions: use pipeline.decompositions, "
                                 "or methods.auto.choose with fold statistics")


class AutoDecomposition:
    """Truncations of a layer by rank, each from the candidate chosen at that rank.

    Shares the candidates' decompositions (owns nothing but the choice and the curve).
    ``predicted_loss[r]`` is the held-out score of the choice at rank r.
    """

    def __init__(self, shape, candidates: Mapping[str, "object"], choice: list[str], heldout: torch.Tensor):
        self.shape = tuple(shape)
        self._decs = dict(candidates)  # method -> WeightedDecomposition (fitted on all samples)
        self.choice = list(choice)  # entry r: the method used at rank r (r = 0 .. max_rank)
        self._heldout = heldout
        self.warnings: list[str] = []
        self.zero_weight = False
        self.left = self.right = None

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def singular_values(self) -> torch.Tensor:
        """Of the weighted matrix of the method chosen at full rank (auto has none of its own)."""
        return self._decs[self.choice[-1]].singular_values

    @property
    def predicted_loss(self) -> torch.Tensor:
        return self._heldout

    def method_at(self, rank: Optional[int]) -> Optional[str]:
        return None if rank is None else self.choice[int(rank)]

    def check_rank(self, rank: int) -> int:
        return self._decs[self.choice[-1]].check_rank(rank)

    def factors(self, rank: int):
        r = self.check_rank(rank)
        return self._decs[self.choice[r]].factors(r)

    def reconstruct(self, rank: int) -> torch.Tensor:
        r = self.check_rank(rank)
        return self._decs[self.choice[r]].reconstruct(r)

    def result(self, rank: int):
        r = self.check_rank(rank)
        return self._decs[self.choice[r]].result(r)

    def nbytes(self) -> int:
        return 0


def runs(choice: list[str]) -> list[list]:
    """Run-length form of a per-rank choice: ``[[first rank, last rank, method], ...]``."""
    out: list[list] = []
    for r, m in enumerate(choice):
        if out and out[-1][2] == m:
            out[-1][1] = r
        else:
            out.append([r, r, m])
    return out


def choose(model, fold_b: Mapping, full: Mapping[str, Mapping], fold_fit: Mapping[str, Mapping],
           candidates, layers=None) -> dict:
    """Auto's per-layer decompositions.

    ``full[method][layer]``: the candidates' decompositions on all calibration samples;
    ``fold_fit[method][layer]``: on fold A only; ``fold_b[layer]``: fold B's statistics (with
    per-sample gradients). Ties go to the earlier candidate.
    """
    from ..compress import LayerDecomposition
    from ..layers import get_weight
    from ..yardstick import per_sample_quadratics

    names = list(layers) if layers is not None else list(next(iter(full.values())))
    out = {}
    for name in names:
        W = get_weight(model.get_submodule(name))
        if fold_b[name].storage is None:
            raise ConfigurationError(f"layer {name}: auto needs per-sample gradients of the held-out fold ('samples')")
        held = []
        for c in candidates:
            q = per_sample_quadratics(fold_b[name], fold_fit[c][name].decomposition, W)
            held.append(q.mean(0).to("cpu"))
        H = torch.stack(held)  # (M, R+1)
        best = H.argmin(0)  # first minimum: ties go to the earlier candidate
        choice = [candidates[int(i)] for i in best]
        envelope = H.gather(0, best[None]).squeeze(0)
        decs = {c: full[c][name].decomposition for c in candidates}
        exact = None
        if all(full[c][name].exact_curve is not None for c in candidates):
            E = torch.stack([full[c][name].exact_curve.to("cpu") for c in candidates])
            exact = E.gather(0, best[None]).squeeze(0)
        ref = full[candidates[0]][name]
        info = {"choice": runs(choice), "candidates": list(candidates),
                "heldout_samples": int(fold_b[name].num_samples), "warnings": []}
        out[name] = LayerDecomposition(name, ref.shape, "auto", AutoDecomposition(ref.shape, decs, choice, envelope),
                                       info, sum(full[c][name].seconds for c in candidates), None, exact,
                                       allocation_curve=envelope, heldout_curves=dict(zip(candidates, H)))
    return out
