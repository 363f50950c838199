"""Symmetric products by blocks against the full float64 product."""

import pytest
import torch

from gfwsvd_core.gram import add_gram, add_sym_product


@pytest.mark.parametrize("m", [7, 255, 256, 1023, 1030])  # 1, 2 and 4 row blocks, uneven edges
def test_symmetric_product_matches_full(m):
    g = torch.Generator().manual_seed(m)
    L = torch.randn(m, 40, generator=g)
    S = torch.randn(40, 40, generator=g)
    R = L @ (S + S.T)  # L (S + S^T) L^T is symmetric
    start = torch.randn(m, m, generator=g, dtype=torch.float64)
    start = start + start.T
    out = add_sym_product(start.clone(), L, R)
    ref = start + L.double() @ R.double().T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert out.dtype == torch.float64
    M = torch.randn(33, m, generator=g)
    gram = add_gram(torch.zeros(m, m, dtype=torch.float64), M)
    torch.testing.assert_close(gram, M.double().T @ M.double(), rtol=1e-5, atol=1e-5 * float(gram.abs().max()))
    if m >= 256:  # block-computed: exactly symmetric by construction
        assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("m", [7, 255, 256, 1030])
@pytest.mark.parametrize("nb", [0, 1, 3, 4])  # the size rule, and explicit (uneven) block counts
def test_half_triangle_product_matches_full(m, nb):
    from gfwsvd_core.gram import half_tril, matmul_tril, tril_matmul

    g = torch.Generator().manual_seed(m + nb)
    B = torch.randn(m, m, generator=g, dtype=torch.float64)
    B = B + B.T
    L = half_tril(B)
    assert torch.equal(L, torch.tril(L)) and torch.equal(L + L.T, B)
    M = torch.randn(29, m, generator=g, dtype=torch.float64)
    torch.testing.assert_close(matmul_tril(M, L, nb), M @ torch.tril(L), rtol=1e-12, atol=1e-12 * m)
    torch.testing.assert_close(tril_matmul(L, M.T, nb), torch.tril(L) @ M.T, rtol=1e-12, atol=1e-12 * m)
    # the half triangle is all a congruence needs: M L M^T + (M L M^T)^T = M B M^T
    P = matmul_tril(M, L, nb) @ M.T
    torch.testing.assert_close(P + P.T, M @ B @ M.T, rtol=1e-10, atol=1e-10 * m)
