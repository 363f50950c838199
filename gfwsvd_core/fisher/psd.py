"""Positive (semi-)definite weights: validation, relative damping and float64 square roots.

A weight ``M`` enters the solver through a root ``L`` with ``M = L L^T``. Roots are taken in
float64. Damping is *relative*: ``M + lambda * tr(M)/dim * I``, so it means the same for factors
of size 1e-9 and 1e3. The damping actually used is reported, and a factor that had to be
replaced by a scaled identity is flagged (``fell_back``), never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: relative eigenvalue tolerance below which a symmetric matrix counts as indefinite
INDEFINITE_TOL = 1e-6
#: relative damping levels tried, in order, when a Cholesky factorisation fails
DAMPING_LADDER = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1, 1.0)


@dataclass
class Root:
    """A root of a PSD weight: ``M ~= L L^T`` (or ``diag(L)**2`` when ``diagonal``)."""

    L: torch.Tensor  # (d, d) lower-triangular float64, or (d,) for a diagonal weight
    diagonal: bool
    damping: float  # relative damping lambda actually added (0 = none)
    fell_back: bool  # True when M was unusable and replaced by a scaled identity
    condition: float  # estimate of cond(L) (ratio of extreme diagonal entries of the factor)
    zero: bool = False  # the weight was exactly zero: the loss does not see this side at all
    requested: float = 0.0  # the damping asked for (``damping`` > requested means it climbed)
    #: "cholesky" (L lower triangular) or "eigen" (L = U diag(sqrt(s)), with ``eig = (U, s)``)
    kind: str = "cholesky"
    eig: Optional[tuple] = None
    floored: int = 0  # eigen: eigenvalues raised to the floor

    @property
    def dim(self) -> int:
        return self.L.shape[0]

    def info(self) -> dict:
        out = {"damping": self.damping, "fell_back": self.fell_back, "condition": self.condition, "zero": self.zero}
        if self.kind != "cholesky":
            out.update(root=self.kind, floored=self.floored)
        return out

    def warnings(self, name: str) -> list[str]:
        """Every way this root departs from the weight as given, one sentence each."""
        if self.zero:
            return [f"the {name} weight is zero: this layer's output does not change the loss on the calibration data"]
        out = []
        if self.fell_back:
            out.append(f"the {name} weight had no usable Cholesky factor at any damping: replaced by a scaled identity")
        elif self.damping > self.requested:
            out.append(f"the {name} weight's damping was raised from {self.requested:g} to {self.damping:g} "
                       "(its Cholesky factorisation failed)")
        return out


def as_weight(M, dim: int, name: str) -> Optional[torch.Tensor]:
    """Validate a weight given as None, a (dim,) vector of diagonal entries or a (dim, dim) matrix."""
    if M is None:
        return None
    if not isinstance(M, torch.Tensor):
        M = torch.as_tensor(M)
    if M.dim() == 1:
        if M.shape[0] != dim:
            raise ValueError(f"{name} weight has {M.shape[0]} diagonal entries, expected {dim}")
    elif M.dim() == 2:
        if tuple(M.shape) != (dim, dim):
            raise ValueError(f"{name} weight has shape {tuple(M.shape)}, expected ({dim}, {dim})")
    else:
        raise ValueError(f"{name} weight must be a vector or a square matrix, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} weight contains NaN or inf")
    return M


def symmetrize(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.transpose(-1, -2))


def damp(M: torch.Tensor, rel: float) -> torch.Tensor:
    """``M + rel * tr(M)/dim * I`` (relative Tikhonov damping)."""
    if rel == 0:
        return M
    d = M.shape[-1]
    scale = torch.diagonal(M).sum() / d
    return M + rel * scale * torch.eye(d, dtype=M.dtype, device=M.device)


#: root kinds of a matrix weight
ROOT_KINDS = ("cholesky", "eigen")


def eigen_root(M: torch.Tensor, floor: float = 0.0, name: str = "weight") -> Root:
    """Symmetric eigen-root ``L = U diag(sqrt(max(s, floor * mean(s))))`` of a PSD matrix (SVD-LLM V2).

    Unlike Cholesky with damping, which adds the damping to every eigenvalue, only eigenvalues
    below the floor are raised to it (a pseudo-inverse floor): a singular input Gram keeps its
    large directions exactly. A clearly indefinite matrix is an error, as for Cholesky.
    """
    M = symmetrize(M.detach().to(torch.float64))
    d = M.shape[0]
    s, U = torch.linalg.eigh(M)
    top = float(s[-1]) if d else 0.0
    if not top > 0:
        if torch.any(M != 0):
            _check_psd(M, name)
        return Root(torch.eye(d, dtype=torch.float64, device=M.device), False, 0.0, True, 1.0,
                    zero=not bool(torch.any(M != 0)), requested=floor, kind="eigen",
                    eig=(torch.eye(d, dtype=torch.float64, device=M.device), torch.ones(d, dtype=torch.float64, device=M.device)))
    if float(s[0]) < -1e-6 * top:
        _check_psd(M, name)
    low = max(floor * float(s.clamp_min(0).mean()), 1e-15 * top)
    floored = int((s < low).sum())
    s = s.clamp_min(low)
    L = U * s.sqrt()[None, :]
    return Root(L, False, floor, False, float((s[-1] / s[0]) ** 0.5), requested=floor, kind="eigen", eig=(U, s),
                floored=floored)


def root(M: torch.Tensor, damping: float = 0.0, name: str = "weight", kind: str = "cholesky") -> Root:
    """Root of a PSD weight (matrix or diagonal vector), float64.

    ``damping`` is always added (relative). If the Cholesky factorisation still fails, the
    damping climbs :data:`DAMPING_LADDER`; a matrix that is clearly indefinite (an eigenvalue
    below ``-1e-6 * largest``) is an error, and one with no positive scale falls back to the
    identity with ``fell_back=True``.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    M = M.detach().to(torch.float64)
    if M.dim() == 1:
        return _diag_root(M, damping, name)
    if kind not in ROOT_KINDS:
        raise ValueError(f"root kind must be one of {ROOT_KINDS}, got {kind!r}")
    if kind == "eigen":
        return eigen_root(M, damping, name)
    M = symmetrize(M)
    d = M.shape[0]
    scale = float(torch.diagonal(M).sum()) / d
    if not scale > 0:
        if scale < 0 or torch.any(M != 0):
            _check_psd(M, name)
        return Root(torch.eye(d, dtype=torch.float64, device=M.device), False, 0.0, True, 1.0,
                    zero=not bool(torch.any(M != 0)), requested=damping)
    tried = [damping] + [lam for lam in DAMPING_LADDER if lam > damping]
    checked = False
    for lam in tried:
        L, info = torch.linalg.cholesky_ex(damp(M, lam))
        if int(info) == 0 and torch.isfinite(L).all():
            diag = torch.diagonal(L).abs()
            return Root(L, False, lam, False, float(diag.max() / diag.min().clamp_min(1e-300)), requested=damping)
        if not checked:  # first failure: tell singular-but-PSD apart from indefinite
            _check_psd(M, name)
            checked = True
    eye = torch.eye(d, dtype=torch.float64, device=M.device) * scale**0.5
    return Root(eye, False, 0.0, True, 1.0, requested=damping)


def _diag_root(w: torch.Tensor, damping: float, name: str) -> Root:
    if (w < 0).any():
        raise ValueError(f"{name} weight has negative diagonal entries: a weight must be positive semi-definite")
    scale = float(w.mean())
    if not scale > 0:
        return Root(torch.ones_like(w), True, 0.0, True, 1.0, zero=True, requested=damping)
    lam = damping
    if (w + lam * scale <= 0).any():  # zero entries: smallest ladder step that makes it PD
        lam = next(x for x in DAMPING_LADDER if x > damping)
    r = torch.sqrt(w + lam * scale)
    return Root(r, True, lam, False, float(r.max() / r.min()), requested=damping)


def _check_psd(M: torch.Tensor, name: str) -> None:
    ev = torch.linalg.eigvalsh(M)
    top = float(ev.abs().max())
    if float(ev[0]) < -INDEFINITE_TOL * max(top, 1e-300):
        raise ValueError(
            f"{name} weight is not positive semi-definite (smallest eigenvalue {float(ev[0]):.3g}, "
            f"largest {float(ev[-1]):.3g})"
        )
