"""nearest_kronecker against the dense Van Loan rearrangement on small float64 cases."""

import math

import pytest
import torch

from gfwsvd_core import nearest_kronecker
from gfwsvd_core.stats import LayerStats


def full_fisher(G: torch.Tensor) -> torch.Tensor:
    """F = 1/K sum vec(G) vec(G)^T with column-major vec (index j*m + i)."""
    K = G.shape[0]
    V = G.transpose(1, 2).reshape(K, -1).double()  # (K, mn), column-major vec
    return V.T @ V / K


def dense_nkp(F: torch.Tensor, m: int, n: int):
    """Top singular pair of the rearranged F: R[(j,l),(i,k)] = F[j*m+i, l*m+k]."""
    R = F.reshape(n, m, n, m).permute(0, 2, 1, 3).reshape(n * n, m * m)
    U, S, Vh = torch.linalg.svd(R)
    A = U[:, 0].reshape(n, n) * S[0]
    B = Vh[0].reshape(m, m)
    return A, B, S


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def random_factored(K=12, T=5, m=7, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(K, T, n, generator=g, dtype=torch.float64)
    # correlated tokens and channels so that the NKP is not K-FAC
    X = X @ torch.randn(n, n, generator=g, dtype=torch.float64)
    D = torch.randn(K, T, m, generator=g, dtype=torch.float64) * (1 + X[..., :1].abs())
    D = torch.cat([D, X[..., :1].expand(-1, -1, 1) * D[..., :1]], -1)[..., :m]
    return X, D


@pytest.mark.parametrize("form", ["materialized", "factored"])
@pytest.mark.parametrize("init", ["identity", "kfac"])
def test_matches_dense_rearrangement(form, init):
    X, D = random_factored()
    G = torch.bmm(D.transpose(1, 2), X)
    m, n = G.shape[1:]
    F = full_fisher(G)
    A_ref, B_ref, S = dense_nkp(F, m, n)
    src = G if form == "materialized" else (X, D)
    res = nearest_kronecker(src, init=init, tol=1e-12, max_sweeps=500)
    assert res.converged
    kron = torch.kron(res.A.double(), res.B.double())
    assert rel(kron, torch.kron(A_ref, B_ref)) < 1e-5
    assert res.s1 == pytest.approx(float(S[0]), rel=1e-5)
    assert res.fisher_norm == pytest.approx(float(torch.linalg.norm(F)), rel=1e-5)
    assert res.eta == pytest.approx(float(S[0] ** 2 / (S**2).sum()), rel=1e-5)
    # the deflated power estimate of s2 is a lower bound that gets close in a few sweeps
    assert res.s2 <= float(S[1]) * (1 + 1e-4)
    assert res.s2 > 0.5 * float(S[1])
    # fit error is ||F - A (x) B|| / ||F||
    assert res.fit_error == pytest.approx(rel(kron, F), rel=1e-4)


def test_factors_are_symmetric_psd():
    X, D = random_factored(seed=3)
    res = nearest_kronecker((X, D), init="identity", tol=1e-10)
    for M in (res.A, res.B):
        assert torch.allclose(M, M.T)
        assert torch.linalg.eigvalsh(M.double()).min() > -1e-6 * torch.linalg.eigvalsh(M.double()).max()
        assert torch.trace(M) > 0


def test_planted_exact_kronecker_fisher():
    """G_k = B^1/2 Z_k A^1/2 with iid Gaussian Z gives F -> A (x) B; with finite K use the exact form:
    G_k = P_k^T ... Here: choose G_k = b_k a_k^T with independent a, b: F = E[aa^T] (x) E[bb^T] exactly
    when the empirical moments factorise, which holds for a full outer-product design."""
    g = torch.Generator().manual_seed(1)
    m, n = 5, 4
    a = torch.randn(6, n, generator=g, dtype=torch.float64)
    b = torch.randn(7, m, generator=g, dtype=torch.float64)
    # every pair (a_i, b_j) once: the empirical F is exactly (mean a a^T) (x) (mean b b^T)
    G = torch.einsum("jm,in->ijmn", b, a).reshape(-1, m, n)
    res = nearest_kronecker(G, init="identity", tol=1e-14, max_sweeps=200)
    assert res.fit_error < 1e-5
    A_true = a.T @ a / a.shape[0]
    B_true = b.T @ b / b.shape[0]
    assert rel(torch.kron(res.A.double(), res.B.double()), torch.kron(A_true, B_true)) < 1e-5


def test_single_token_samples_kfac_fixed_point_for_one_datum():
    """One datum: F = (x x^T) (x) (d d^T) exactly; K-FAC and the NKP coincide."""
    x = torch.randn(1, 1, 6, dtype=torch.float64)
    d = torch.randn(1, 1, 4, dtype=torch.float64)
    res = nearest_kronecker((x, d), init="identity", tol=1e-14)
    assert res.fit_error < 1e-6
    kfac = torch.kron(x[0].T @ x[0], d[0].T @ d[0])
    assert rel(torch.kron(res.A.double(), res.B.double()), kfac) < 1e-6


def test_lanczos_sign_fixed_and_matches_als():
    X, D = random_factored(seed=5)
    als = nearest_kronecker((X, D), tol=1e-12, max_sweeps=500)
    lz = nearest_kronecker((X, D), method="lanczos", tol=1e-10)
    assert torch.trace(lz.A) > 0 and torch.trace(lz.B) > 0
    assert torch.allclose(lz.A, lz.A.T)
    assert rel(torch.kron(lz.A.double(), lz.B.double()), torch.kron(als.A.double(), als.B.double())) < 1e-5


def test_layerstats_input_and_kfac_init_from_stats():
    X, D = random_factored(seed=2)
    st = LayerStats("l", out_features=D.shape[2], in_features=X.shape[2], sample_unit="sequence",
                    num_samples=X.shape[0], num_tokens=X.shape[0] * X.shape[1], X=X.float(), D=D.float())
    st.xx_sum = X.reshape(-1, X.shape[2]).T @ X.reshape(-1, X.shape[2])
    a = nearest_kronecker(st, init="kfac", tol=1e-12, max_sweeps=500)
    b = nearest_kronecker((X, D), init="identity", tol=1e-12, max_sweeps=500)
    assert a.init == "kfac"
    assert rel(torch.kron(a.A.double(), a.B.double()), torch.kron(b.A.double(), b.B.double())) < 1e-4


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        nearest_kronecker(torch.zeros(0, 3, 2))
    with pytest.raises(ValueError, match="NaN"):
        nearest_kronecker(torch.full((2, 3, 2), math.nan))
    with pytest.raises(ValueError, match="shape"):
        nearest_kronecker(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="X .K, T, n. and D"):
        nearest_kronecker((torch.zeros(2, 3, 4), torch.zeros(2, 4, 5)))
    with pytest.raises(ValueError, match="init"):
        nearest_kronecker(torch.ones(2, 3, 2), init="random")
    st = LayerStats("enc.l", 3, 2, "sequence")
    with pytest.raises(ValueError, match="enc.l.*add 'samples'"):
        nearest_kronecker(st)
    st = LayerStats("enc.l", 3, 2, "sequence", X=torch.zeros(0, 1, 2), D=torch.zeros(0, 1, 3))
    with pytest.raises(ValueError, match="enc.l.*empty"):
        nearest_kronecker(st)


def test_fisher_norm_estimate_for_many_samples(monkeypatch):
    """Token samples: ||F|| from random partners is close to the exact value and flagged."""
    import gfwsvd_core.fisher.kronecker as kr

    g = torch.Generator().manual_seed(7)
    X = torch.randn(1500, 1, 6, generator=g, dtype=torch.float64)
    D = torch.randn(1500, 1, 5, generator=g, dtype=torch.float64) * (1 + X[..., :1].abs())
    exact = nearest_kronecker((X, D), tol=1e-10)
    monkeypatch.setattr(kr, "MAX_PARTNERS", 300)
    est = nearest_kronecker((X, D), tol=1e-10)
    assert not exact.fisher_norm_estimated and est.fisher_norm_estimated
    assert est.fisher_norm == pytest.approx(exact.fisher_norm, rel=0.05)
    G = torch.bmm(D.transpose(1, 2), X)
    assert exact.fisher_norm == pytest.approx(float(torch.linalg.norm(full_fisher(G))), rel=1e-8)


# 1, 2 and 4 symmetric row blocks on either side: tall layers (m > n) and wide ones (n > m)
@pytest.mark.parametrize("m,n", [(7, 9), (300, 9), (1030, 9), (9, 300), (9, 1030)])
@pytest.mark.parametrize("form", ["materialized", "factored"])
@pytest.mark.parametrize("chunk_bytes", [None, 1])  # one chunk, or one sample per chunk
def test_maps_match_brute_force(m, n, form, chunk_bytes, monkeypatch):
    from gfwsvd_core.fisher import kronecker as kr

    if chunk_bytes is not None:
        monkeypatch.setattr(kr, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(m + n)
    K, T = 5, 4
    X = torch.randn(K, T, n, generator=g, dtype=torch.float64)
    D = torch.randn(K, T, m, generator=g, dtype=torch.float64)
    G = torch.bmm(D.transpose(1, 2), X)
    S = kr._Samples(G=G) if form == "materialized" else kr._Samples(X=X, D=D)
    assert S.chunk == 1 if chunk_bytes else S.chunk >= K
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A + A.T  # indefinite, as Krylov vectors are
    B = torch.randn(m, m, generator=g, dtype=torch.float64)
    B = B + B.T
    out = torch.einsum("kin,nl,kjl->ij", G, A, G) / K
    inn = torch.einsum("kmi,mp,kpj->ij", G, B, G) / K
    torch.testing.assert_close(S.out_map(A), out, rtol=1e-10, atol=1e-10 * float(out.abs().max()))
    torch.testing.assert_close(S.in_map(B), inn, rtol=1e-10, atol=1e-10 * float(inn.abs().max()))
    if form == "factored":  # by its triangle plus transpose: exactly symmetric
        assert torch.equal(S.in_map(B), S.in_map(B).T)
    assert S.fisher_norm_sq() == pytest.approx(float(torch.linalg.norm(full_fisher(G)) ** 2), rel=1e-10)


@pytest.mark.parametrize("d", [5, 300])
def test_psd_projection_clips_exactly_the_negative_eigenvalues(d):
    """Against a full float64 eigendecomposition: the projection, and the clipped mass."""
    from gfwsvd_core.fisher.kronecker import _psd_projection

    g = torch.Generator().manual_seed(d)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, -6, d, dtype=torch.float64)
    ev[-(d // 5 + 1):] *= -1e-3  # a tail of small negative eigenvalues, as float32 rounding leaves
    M = (Q * ev) @ Q.T
    P, clipped = _psd_projection(M)
    w, V = torch.linalg.eigh(0.5 * (M + M.T))
    expect = (V * w.clamp(min=0)) @ V.T
    torch.testing.assert_close(P, expect, rtol=0, atol=1e-12)
    assert clipped == pytest.approx(float(w.clamp(max=0).norm() / w.norm()), rel=1e-9)
    assert torch.linalg.eigvalsh(P).min() > -1e-14
    # a PSD matrix passes untouched and reports nothing clipped
    P2, c2 = _psd_projection(expect + 1e-3 * torch.eye(d, dtype=torch.float64))
    assert c2 == 0.0 and torch.equal(P2, 0.5 * (P2 + P2.T))
    # with a span: the nearest PSD matrix whose range lies in it, brute force by its r x r block
    r = d // 2 + 1
    span = Q[:, :r]
    P3, c3 = _psd_projection(M, span)
    wr, Vr = torch.linalg.eigh(span.T @ M @ span)
    expect3 = span @ ((Vr * wr.clamp(min=0)) @ Vr.T) @ span.T
    torch.testing.assert_close(P3, expect3, rtol=0, atol=1e-12)
    assert c3 == pytest.approx(float((M - expect3).norm() / M.norm()), rel=1e-9)
    assert torch.linalg.eigvalsh(P3).min() > -1e-14


def test_float32_solve_clips_almost_nothing_and_keeps_the_requested_damping():
    """A float32 Krylov solve on a wide-spectrum layer whose output side has more rows than tokens:
    what the projection removes is rounding-sized, and the factors' Cholesky roots succeed at the
    method's damping (no escalation)."""
    g = torch.Generator().manual_seed(7)
    K, T, n, m = 8, 24, 40, 300
    X = torch.randn(K, T, n, generator=g) * torch.logspace(0, -3, n)
    D = torch.randn(K, T, m, generator=g) * torch.logspace(0, -3, m)
    for source in (torch.bmm(D.transpose(1, 2), X), (X, D)):  # materialised; factored (span of the tokens)
        res = nearest_kronecker(source, tol=1e-6, refine=0)
        assert res.psd_clipped < 1e-6
        _check_factors_psd_at_damping(res)


def _check_factors_psd_at_damping(res):
    from gfwsvd_core.fisher.psd import root

    for M in (res.A, res.B):
        assert torch.linalg.eigvalsh(M).min() >= -1e-12 * float(torch.linalg.eigvalsh(M).max())
        r = root(M, damping=1e-6)
        assert r.damping == r.requested == 1e-6 and not r.fell_back


@pytest.mark.parametrize("m,n", [(300, 40), (40, 300), (1030, 260), (200, 200)])
@pytest.mark.parametrize("form", ["materialized", "factored"])
def test_map_pair_flops_count_what_the_maps_run(m, n, form):
    """The plan's and the time estimate's flops of one Krylov step equal the matmul flops the two
    maps run (torch's flop counter), on every branch: tall, wide, square, factored."""
    from torch.utils.flop_counter import FlopCounterMode

    from gfwsvd_core.fisher import kronecker as kr
    from gfwsvd_core.statistics import map_pair_flops

    K, T = 3, 7
    g = torch.Generator().manual_seed(m + n)
    X, D = torch.randn(K, T, n, generator=g), torch.randn(K, T, m, generator=g)
    S = kr._Samples(G=torch.bmm(D.transpose(1, 2), X)) if form == "materialized" else kr._Samples(X=X, D=D)
    A, B = torch.randn(n, n, generator=g), torch.randn(m, m, generator=g)
    with FlopCounterMode(display=False) as fc:
        S.out_map(A + A.T)
        S.in_map(B + B.T)
    assert fc.get_total_flops() == pytest.approx(K * map_pair_flops(m, n, T, form), rel=0.02)


def test_tf32_is_a_cuda_only_switch_that_leaves_the_setting_as_it_was():
    """On the CPU ``tf32`` changes nothing (bitwise); the method spec carries it; a bad value is a
    clear error. Its speed and accuracy on a GPU are measured by bench/gpu.sh."""
    from gfwsvd_core.errors import ConfigurationError
    from gfwsvd_core.fisher.kronecker import _tf32
    from gfwsvd_core.methods import get_method

    X, D = random_factored(seed=5)
    a = nearest_kronecker((X, D), tol=1e-8, refine=2)
    b = nearest_kronecker((X, D), tol=1e-8, refine=2, tf32=True)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    before = torch.backends.cuda.matmul.fp32_precision
    with _tf32(True, torch.device("cpu")):
        assert torch.backends.cuda.matmul.fp32_precision == before
    assert get_method("gfwsvd[tf32=true,refine=2]").tf32 is True
    with pytest.raises(ConfigurationError, match="tf32"):
        get_method("gfwsvd", tf32="yes")


@pytest.mark.parametrize("form", ["materialized", "factored"])
def test_factors_lie_in_the_span_of_the_sample_vectors(form, monkeypatch):
    """With few samples the output-side factor is rank-deficient: the projection inside the span
    of the samples' vectors (columns of each G_k, or the tokens' D_k rows) gives the full
    eigendecomposition's PSD projection up to rounding, and nothing outside the span."""
    from gfwsvd_core.fisher import kronecker as kr

    g = torch.Generator().manual_seed(11)
    K, T, n, m = 2, 30, 40, 300  # K n = 80 and K T = 60 vectors for 300 output rows
    X = torch.randn(K, T, n, generator=g, dtype=torch.float64)
    D = torch.randn(K, T, m, generator=g, dtype=torch.float64) * torch.logspace(0, -2, m, dtype=torch.float64)
    src = torch.bmm(D.transpose(1, 2), X) if form == "materialized" else (X, D)
    S, _ = kr._as_samples(src)
    span = kr._sample_span(S, "out")
    assert span is not None and span.shape == (m, K * n if form == "materialized" else K * T)
    assert kr._sample_span(S, "in") is None  # 40 input columns: no smaller span to use
    res = nearest_kronecker(src, tol=1e-10, refine=0)
    outside = res.B - span @ (span.T @ res.B @ span) @ span.T
    assert float(outside.norm()) < 1e-12 * float(res.B.norm())
    monkeypatch.setattr(kr, "SPAN_SHARE", 0.0)  # the d x d route: full eigendecomposition and clip
    assert kr._sample_span(S, "out") is None
    full = nearest_kronecker(src, tol=1e-10, refine=0)
    torch.testing.assert_close(res.B, full.B, rtol=0, atol=1e-10 * float(full.B.norm()))
    torch.testing.assert_close(res.A, full.A, rtol=0, atol=1e-10 * float(full.A.norm()))


def test_batch_solve_matches_one_by_one_across_shapes_and_batches(monkeypatch):
    """nearest_kronecker_batch groups layers by shape and storage (a layer alone in its shape is
    solved by itself) and splits a group by BATCH_BYTES; the factors and diagnostics equal the
    one-by-one solve's to rounding."""
    from gfwsvd_core.fisher import kronecker as kr

    g = torch.Generator().manual_seed(3)
    srcs = [torch.randn(12, 10, 7, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 7, dtype=torch.float64)
            for _ in range(5)]
    srcs += [random_factored(seed=s) for s in range(3)]
    srcs += [torch.randn(12, 9, 7, generator=g, dtype=torch.float64)]  # alone in its shape
    one = [nearest_kronecker(s, tol=1e-9) for s in srcs]
    # room for two materialised layers per batch (5 -> 2 + 2 + one alone); the factored ones
    # are smaller: all 3 in one batch
    per = 12 * 10 * 7 * 8 + kr.KRYLOV_BASIS_STEPS * 8 * (100 + 49)
    monkeypatch.setattr(kr, "BATCH_BYTES", 2 * per + 1)
    from gfwsvd_core.fisher import krylov

    batches, real = [], krylov.top_singular_triplets_batched

    def spy(apply, apply_t, start, **kw):
        batches.append(start.shape[0])
        return real(apply, apply_t, start, **kw)

    monkeypatch.setattr(krylov, "top_singular_triplets_batched", spy)
    many = kr.nearest_kronecker_batch(srcs, tol=1e-9)
    assert sorted(batches) == [2, 2, 3]
    for a, b in zip(one, many):
        assert rel(b.A, a.A) < 1e-10 and rel(b.B, a.B) < 1e-10
        assert b.sweeps == a.sweeps and b.s1 == pytest.approx(a.s1, rel=1e-12)
        assert b.s2 == pytest.approx(a.s2, rel=1e-10) and b.fisher_norm == pytest.approx(a.fisher_norm, rel=1e-12)
        assert b.converged and b.psd_clipped == pytest.approx(a.psd_clipped, abs=1e-12)
