"""Symmetric matrix products by their upper block triangle (there is no SYRK in torch).

Grams such as ``sum_t x x^T`` and the Kronecker maps' ``sum_k G_k A G_k^T`` are symmetric, so
with four row blocks 10 of the 16 output blocks are computed (0.62x the flops of a full GEMM);
smaller outputs use fewer blocks, where the block GEMMs would lose more in efficiency.
"""

from __future__ import annotations

import torch


def _blocks(m: int) -> int:
    return 4 if m >= 1024 else 2 if m >= 256 else 1


def add_sym_product(out: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``out += L @ R.T`` for a product known to be symmetric (``out`` m x m; L, R m x k).

    ``out`` may be float64 with float32 operands: each block is accumulated with promotion, no
    float64 copy of the product is made. Returns ``out``.
    """
    m = out.shape[0]
    nb = _blocks(m)
    if nb == 1:
        out += L @ R.T
        return out
    edges = [m * i // nb for i in range(nb + 1)]
    for i in range(nb):
        lo, hi = edges[i], edges[i + 1]
        blk = L[lo:hi] @ R[lo:].T  # rows of block i, columns from its diagonal block on
        out[lo:hi, lo:] += blk
        if hi < m:  # the part right of the diagonal block, mirrored below it
            out[hi:, lo:hi] += blk[:, hi - lo:].T
    return out


def add_gram(out: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``out += M^T M`` (out n x n for M of shape (N, n)), by :func:`add_sym_product`."""
    return add_sym_product(out, M.T, M.T)


def half_tril(B: torch.Tensor) -> torch.Tensor:
    """Lower triangle of a symmetric ``B`` with its diagonal halved: ``B = L + L^T``."""
    L = torch.tril(B)
    L.diagonal().mul_(0.5)
    return L


def tril_matmul(L: torch.Tensor, M: torch.Tensor, nb: int = 0) -> torch.Tensor:
    """``L @ M`` for a lower-triangular ``L`` (m x m; M m x N), skipping the zero upper blocks.

    Row block i of ``L`` is zero right of its diagonal block, so it only meets the first rows
    of ``M``: with four blocks 0.62x the flops of a full GEMM.
    """
    m = L.shape[0]
    nb = nb or _blocks(m)
    if nb == 1:
        return L @ M
    out = M.new_empty(m, M.shape[1])
    edges = [m * i // nb for i in range(nb + 1)]
    for i in range(nb):
        lo, hi = edges[i], edges[i + 1]
        torch.matmul(L[lo:hi, :hi], M[:hi], out=out[lo:hi])
    return out


def matmul_tril(M: torch.Tensor, L: torch.Tensor, nb: int = 0) -> torch.Tensor:
    """``M @ L`` for a lower-triangular ``L`` (m x m; M N x m), skipping the zero upper blocks.

    Column block j of ``L`` is zero above its diagonal block, so it only meets the last columns
    of ``M``: with four blocks 0.62x the flops of a full GEMM.
    """
    m = L.shape[0]
    nb = nb or _blocks(m)
    if nb == 1:
        return M @ L
    out = M.new_empty(M.shape[0], m)
    edges = [m * i // nb for i in range(nb + 1)]
    for j in range(nb):
        lo, hi = edges[j], edges[j + 1]
        torch.matmul(M[:, lo:], L[lo:, lo:hi], out=out[:, lo:hi])
    return out

