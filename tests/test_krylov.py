"""Golub-Kahan-Lanczos on the rearranged Fisher against the dense Van Loan reference.

The reference forms the rearranged Fisher restricted to symmetric factors as a matrix (small
cases only), so its SVD gives the exact s1, s2 and top pair.
"""

import math

import pytest
import torch

from gfwsvd_core.fisher.kronecker import _Samples
from gfwsvd_core.fisher.krylov import top_singular_triplets


def sym_basis(d):
    """Orthonormal basis of symmetric d x d matrices, as rows of a (d(d+1)/2, d*d) matrix."""
    rows = []
    for i in range(d):
        for j in range(i, d):
            E = torch.zeros(d, d, dtype=torch.float64)
            if i == j:
                E[i, i] = 1
            else:
                E[i, j] = E[j, i] = 1 / math.sqrt(2)
            rows.append(E.reshape(-1))
    return torch.stack(rows)


def dense_reference(S):
    """SVD of R restricted to symmetric matrices: R(B) = E[G^T B G] as a matrix."""
    Pm, Pn = sym_basis(S.m), sym_basis(S.n)
    cols = [S.in_map(b.reshape(S.m, S.m)).reshape(-1) for b in Pm]
    R = Pn @ torch.stack(cols, 1)  # (sym n, sym m)
    U, s, Vh = torch.linalg.svd(R)
    u = (Pn.T @ U[:, 0]).reshape(S.n, S.n)
    v = (Pm.T @ Vh[0]).reshape(S.m, S.m)
    if torch.trace(u) < 0:
        u, v = -u, -v
    return s, u, v


def samples(kind, K=24, m=10, n=7, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        G = torch.randn(K, m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
        return _Samples(G=G)
    if kind == "planted":  # G_k = L_k Z R_k with F exactly A (x) B: vec(G) ~ N(0, A (x) B)
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        B = torch.randn(m, m, generator=g, dtype=torch.float64)
        Z = torch.randn(4000, m, n, generator=g, dtype=torch.float64)
        return _Samples(G=B @ Z @ A.T), (A @ A.T, B @ B.T)
    if kind == "degenerate":  # two Kronecker blocks on disjoint rows and columns: s2/s1 ~ 0.97
        Z = torch.randn(2, 3000, m // 2, n // 2, generator=g, dtype=torch.float64)
        a = torch.linspace(1, 2, n // 2, dtype=torch.float64).sqrt()
        b = torch.linspace(2, 1, m // 2, dtype=torch.float64).sqrt()
        G = torch.zeros(6000, m, n, dtype=torch.float64)
        G[:3000, : m // 2, : n // 2] = b[:, None] * Z[0] * a[None, :]
        G[3000:, m // 2 : 2 * (m // 2), n // 2 : 2 * (n // 2)] = 0.985 * b.flip(0)[:, None] * Z[1] * a.flip(0)[None, :]
        return _Samples(G=G)
    if kind == "factored":
        X = torch.randn(K, T, n, generator=g, dtype=torch.float64)
        D = torch.randn(K, T, m, generator=g, dtype=torch.float64) * (1 + X[..., :1].abs())
        return _Samples(X=X, D=D)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "degenerate", "factored"])
def test_top_triplet_and_gap_match_the_dense_reference(kind):
    S = samples(kind)
    s, u, v = dense_reference(S)
    r = top_singular_triplets(S.in_map, S.out_map, torch.eye(S.n, dtype=torch.float64), tol=1e-9, max_steps=200)
    assert r.converged
    assert r.s1 == pytest.approx(float(s[0]), rel=1e-10)
    # s2 is a Ritz value: a lower bound of the true one (interlacing), close once s1 has converged
    assert float(s[1]) * (1 - 1e-3) <= r.s2 <= float(s[1]) * (1 + 1e-12)
    sign = 1.0 if float((r.u * u).sum()) > 0 else -1.0
    angle = float(torch.linalg.vector_norm(sign * r.u - u))
    assert angle <= 1e-9 * 10
    # the stopping rule's bound holds: sin(angle) <= bound (up to rounding)
    assert angle <= r.bound + 1e-12
    if kind == "degenerate":
        assert float(s[1] / s[0]) > 0.95


def test_planted_kronecker_is_recovered():
    S, (A, B) = samples("planted")
    r = top_singular_triplets(S.in_map, S.out_map, torch.eye(S.n, dtype=torch.float64), tol=1e-10)
    Ahat = r.u * math.copysign(1, float(torch.trace(r.u)))
    # the sample Fisher of 4000 draws is close to A (x) B: the factor's direction matches A's
    cos = float((Ahat * A).sum() / A.norm())
    assert cos > 0.99
    assert r.s2 / r.s1 < 0.1  # nearly exact Kronecker: a wide gap


def test_bound_is_honest_when_stopping_early():
    S = samples("degenerate")
    _, u, _ = dense_reference(S)
    for tol in (1e-2, 1e-4):
        r = top_singular_triplets(S.in_map, S.out_map, torch.eye(S.n, dtype=torch.float64), tol=tol)
        sign = 1.0 if float((r.u * u).sum()) > 0 else -1.0
        assert r.bound <= tol
        assert float(torch.linalg.vector_norm(sign * r.u - u)) <= 1.5 * r.bound  # ||u - u*|| ~ sin(theta)


def test_restarts_keep_memory_bounded_and_still_converge():
    S = samples("degenerate")
    s, u, _ = dense_reference(S)
    per_pair = (S.n * S.n + S.m * S.m) * 8
    r = top_singular_triplets(S.in_map, S.out_map, torch.eye(S.n, dtype=torch.float64), tol=1e-8,
                              max_steps=400, basis_bytes=5 * per_pair)
    assert r.restarts > 0 and r.converged
    assert r.s1 == pytest.approx(float(s[0]), rel=1e-10)


def test_fewer_map_pairs_than_power_iteration():
    """The point of Krylov: a gap of s2/s1 ~ 0.98 costs ALS hundreds of sweeps."""
    S = samples("degenerate")
    r = top_singular_triplets(S.in_map, S.out_map, torch.eye(S.n, dtype=torch.float64), tol=1e-6)
    ratio = (r.s2 / r.s1) ** 2
    als_sweeps = math.log(1e-6) / math.log(ratio)
    assert r.steps < als_sweeps / 3, (r.steps, als_sweeps)


def _kron_rel_diff(A, B, A0, B0):
    """||A (x) B - A0 (x) B0|| / ||A0 (x) B0||, from Frobenius inner products (no mn x mn matrix)."""
    A, B, A0, B0 = (t.double() for t in (A, B, A0, B0))
    ip = lambda P, Q: float((P * Q).sum())  # noqa: E731
    sq = ip(A, A) * ip(B, B) - 2 * ip(A, A0) * ip(B, B0) + ip(A0, A0) * ip(B0, B0)
    return math.sqrt(max(sq, 0.0) / (ip(A0, A0) * ip(B0, B0)))


def test_float32_maps_with_float64_refinement_match_a_float64_solve_to_1e_5():
    from gfwsvd_core.fisher.kronecker import nearest_kronecker

    g = torch.Generator().manual_seed(3)
    K, T, m, n = 32, 24, 48, 40
    scale = torch.logspace(0, -3, n, dtype=torch.float64)  # inputs over three decades, as in real layers
    X = torch.randn(K, T, n, generator=g, dtype=torch.float64) * scale
    D = torch.randn(K, T, m, generator=g, dtype=torch.float64) * (1 + X[..., :1].abs() / scale[0])
    ref = nearest_kronecker((X, D), tol=1e-12, max_sweeps=200, refine=0)
    mixed = nearest_kronecker((X.float(), D.float()), refine=2)
    plain = nearest_kronecker((X.float(), D.float()), refine=0)
    assert _kron_rel_diff(mixed.A, mixed.B, ref.A, ref.B) <= 1e-5
    assert _kron_rel_diff(mixed.A, mixed.B, ref.A, ref.B) <= _kron_rel_diff(plain.A, plain.B, ref.A, ref.B)


def test_float32_solve_on_a_wide_spectrum_layer_is_accurate_without_refinement():
    """The float32 maps alone (refine=0) stay within 1e-6 of a float64 solve on a 768 x 192 layer
    whose channels span three decades on both sides. The Krylov bases must be float64 for that:
    float32 bases (inner products over m^2 entries) measured 5e-5 here, against 3e-7."""
    from gfwsvd_core.fisher.kronecker import nearest_kronecker

    g = torch.Generator().manual_seed(3)
    K, T, m, n = 32, 64, 768, 192
    sx = torch.logspace(0, -3, n, dtype=torch.float64)
    sd = torch.logspace(0, -3, m, dtype=torch.float64)
    X = torch.randn(K, T, n, generator=g, dtype=torch.float64) * sx
    D = torch.randn(K, T, m, generator=g, dtype=torch.float64) * sd * (1 + X[..., :1].abs() / sx[0])
    ref = nearest_kronecker((X, D), tol=1e-10, max_sweeps=200, refine=0, diagnostics=False)
    f32 = nearest_kronecker((X.float(), D.float()), tol=1e-6, refine=0, diagnostics=False)
    assert _kron_rel_diff(f32.A, f32.B, ref.A, ref.B) < 1e-6


def test_batched_solver_matches_one_by_one_and_stops_each_problem_by_its_own_bound():
    """Problems of one shape in lockstep: every triplet, s2, bound and step count equals the single
    solver's (they stop at different steps: the batch shrinks), float64 to rounding."""
    from gfwsvd_core.fisher.kronecker import _Stacked
    from gfwsvd_core.fisher.krylov import top_singular_triplets_batched

    for kind in ("random", "factored"):
        probs = [samples(kind, seed=s) for s in range(4)]
        starts = torch.stack([torch.eye(probs[0].n, dtype=torch.float64) + 0.1 * s * torch.ones(probs[0].n, probs[0].n,
                              dtype=torch.float64) for s in range(4)])
        one = [top_singular_triplets(S.in_map, S.out_map, A0, tol=1e-9) for S, A0 in zip(probs, starts)]
        stacked = _Stacked(probs)
        many = top_singular_triplets_batched(stacked.in_map, stacked.out_map, starts, tol=1e-9)
        assert len({r.steps for r in one}) > 1  # the batch really shrinks
        for a, b in zip(one, many):
            assert b.converged and b.steps == a.steps
            assert b.s1 == pytest.approx(a.s1, rel=1e-12) and b.s2 == pytest.approx(a.s2, rel=1e-10)
            assert float(torch.linalg.vector_norm(a.u - b.u)) < 1e-10
            assert float(torch.linalg.vector_norm(a.v - b.v)) < 1e-10
            assert b.bound == pytest.approx(a.bound, rel=1e-6)
        capped = top_singular_triplets_batched(stacked.in_map, stacked.out_map, starts, tol=1e-14, max_steps=3)
        assert all(r.steps == 3 and not r.converged for r in capped)
