"""weighted_svd against brute force: the exact weighted least-squares optimum and its objective."""

import pytest
import torch

from gfwsvd_core import decompose, weighted_svd


def spd(d, seed, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    return Q @ torch.diag(ev) @ Q.T


def objective(W, Wr, left, right):
    """||L_out^T (W - Wr) L_in||^2 = tr(dW^T B dW A) with B = left, A = right (matrices)."""
    dW = (W - Wr).double()
    B = torch.eye(W.shape[0], dtype=torch.float64) if left is None else (torch.diag(left) if left.dim() == 1 else left)
    A = torch.eye(W.shape[1], dtype=torch.float64) if right is None else (torch.diag(right) if right.dim() == 1 else right)
    return float(torch.trace(dW.T @ B @ dW @ A))


def brute_force_optimum(W, r, left, right):
    """Exact rank-r minimiser via the Kronecker least-squares problem in vec form.

    min ||M^1/2 (vec W - vec W_r)|| over rank-r W_r: equals Eckart-Young in whitened
    coordinates, computed here independently with symmetric (eigen) roots instead of Cholesky.
    """
    def sqrtm(M):
        ev, Q = torch.linalg.eigh(M)
        return Q @ torch.diag(ev.clamp_min(0).sqrt()) @ Q.T
    Bh, Ah = sqrtm(left), sqrtm(right)
    U, S, Vh = torch.linalg.svd(Bh @ W @ Ah)
    Wt_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    return torch.linalg.solve(Bh, Wt_r) @ torch.linalg.inv(Ah)


@pytest.mark.parametrize("m,n", [(7, 5), (5, 7), (6, 6)])
def test_matches_brute_force_optimum_and_predicted_loss(m, n):
    g = torch.Generator().manual_seed(m * 10 + n)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    B, A = spd(m, 1, cond=50), spd(n, 2, cond=20)
    for r in range(1, min(m, n) + 1):
        res = weighted_svd(W, r, left=B, right=A)
        Wr = res.up.double() @ res.down.double()
        ref = brute_force_optimum(W, r, B, A)
        assert torch.allclose(Wr, ref, atol=1e-9, rtol=1e-7)
        obj = objective(W, Wr, B, A)
        assert obj == pytest.approx(2 * float(res.predicted_loss[r]), rel=1e-8, abs=1e-12)
        # no random rank-r competitor beats it
        for s in range(3):
            gs = torch.Generator().manual_seed(s)
            P = Wr + 1e-2 * torch.randn(m, r, generator=gs, dtype=torch.float64) @ torch.randn(r, n, generator=gs, dtype=torch.float64)
            alt = torch.linalg.svd(P)
            P_r = alt.U[:, :r] @ torch.diag(alt.S[:r]) @ alt.Vh[:r]
            assert objective(W, P_r, B, A) >= obj - 1e-10


@pytest.mark.parametrize("left,right", [(None, None), ("mat", None), (None, "mat"), ("mat", "mat"), ("diag", "mat"), ("diag", "diag")])
def test_full_rank_returns_W(left, right):
    m, n = 9, 6
    W = torch.randn(m, n, dtype=torch.float64)
    mk = {"mat": lambda d, s: spd(d, s, cond=1e3), "diag": lambda d, s: torch.rand(d, dtype=torch.float64) + 0.1, None: lambda d, s: None}
    res = weighted_svd(W, min(m, n), left=mk[left](m, 3), right=mk[right](n, 4))
    assert torch.allclose(res.up @ res.down, W, atol=1e-9)
    assert float(res.predicted_loss[-1]) == 0.0


def test_full_rank_float32_within_1e6():
    W = torch.randn(48, 32)
    res = weighted_svd(W, 32, left=spd(48, 1, cond=1e2).float(), right=spd(32, 2, cond=1e2).float())
    assert res.up.dtype == torch.float32
    assert float((res.up @ res.down - W).abs().max() / W.abs().max()) < 1e-6


def test_identity_weights_reduce_to_svd():
    W = torch.randn(8, 5, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    for left, right in [(None, None), (torch.eye(8, dtype=torch.float64), torch.eye(5, dtype=torch.float64)), (torch.ones(8, dtype=torch.float64), None)]:
        res = weighted_svd(W, 2, left=left, right=right)
        assert torch.allclose(res.up @ res.down, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-10)
        assert torch.allclose(res.singular_values, S)


def test_error_non_increasing_in_rank_and_predicted_curve():
    W = torch.randn(10, 8, dtype=torch.float64)
    B, A = spd(10, 5), spd(8, 6)
    dec = decompose(W, B, A)
    pl = dec.predicted_loss
    assert pl.shape == (9,)
    assert torch.all(pl[1:] <= pl[:-1])
    assert float(pl[0]) == pytest.approx(0.5 * float((dec.singular_values**2).sum()))
    errs = [objective(W, dec.reconstruct(r), B, A) for r in range(1, 9)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))


def test_singular_psd_weight_is_damped_and_reported():
    W = torch.randn(6, 4, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    A = x @ x.T  # rank 2: PSD but singular
    res = weighted_svd(W, 4, right=A)
    assert res.info["right_damping"] > 0
    assert not res.info["right_fell_back"]
    assert torch.allclose(res.up @ res.down, W, atol=1e-6)


def test_bad_input():
    W = torch.randn(6, 4)
    for r in (0, 5, -1):
        with pytest.raises(ValueError, match="rank must be between 1 and min"):
            weighted_svd(W, r)
    with pytest.raises(ValueError, match="integer"):
        weighted_svd(W, 1.5)
    with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
        weighted_svd(W, 2, right=torch.eye(6))
    with pytest.raises(ValueError, match="expected 6"):
        weighted_svd(W, 2, left=torch.ones(4))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        weighted_svd(W, 2, right=-torch.eye(4))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        weighted_svd(W, 2, right=torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5])))
    with pytest.raises(ValueError, match="negative diagonal"):
        weighted_svd(W, 2, left=-torch.ones(6))
    with pytest.raises(ValueError, match="NaN"):
        weighted_svd(W, 2, left=torch.full((6,), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        weighted_svd(torch.full((3, 3), float("inf")), 1)
    with pytest.raises(ValueError, match="2-D"):
        weighted_svd(torch.ones(3), 1)


def held_bytes(obj, inputs=()):
    """Bytes of the tensors reachable through ``obj``'s attributes (each storage once), leaving
    out the storages of ``inputs`` (the caller's weights, referenced rather than copied)."""
    seen = {}

    def walk(o, depth):
        if isinstance(o, torch.Tensor):
            seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        elif depth < 4:
            values = vars(o).values() if hasattr(o, "__dict__") else (o if isinstance(o, (list, tuple, dict)) else ())
            for v in (values.values() if isinstance(values, dict) else values):
                walk(v, depth + 1)

    walk(obj, 0)
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(b for ptr, b in seen.items() if ptr not in skip)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-9)])
def test_decomposition_keeps_only_truncation_factors(dtype, tol):
    """A 64 x 48 layer with full Kronecker roots: the decomposition holds about 1.8x the weight's
    bytes (it used to hold a float64 W, U, V and both roots: ~10x the float32 weight), and every rank is still the
    exact weighted optimum, a slice of the full-rank factors."""
    m, n = 64, 48
    g = torch.Generator().manual_seed(7)
    W = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    B, A = spd(m, 1, cond=30), spd(n, 2, cond=20)
    dec = decompose(W, B, A)
    wbytes = m * n * W.element_size()
    held = held_bytes(dec, inputs=(B, A))
    assert held <= 2 * wbytes, f"{held} bytes held, {held / wbytes:.1f}x the weight"
    assert held == dec.nbytes()
    up_all, down_all = dec.factors(dec.max_rank)
    for r in (1, 5, 17, 47, 48):
        up, down = dec.factors(r)
        assert up.dtype == down.dtype == dtype and up.shape == (m, r) and down.shape == (r, n)
        assert torch.equal(up, up_all[:, :r]) and torch.equal(down, down_all[:r])
        ref = brute_force_optimum(W.double(), r, B, A)
        scale = float(ref.abs().max())
        assert float((dec.reconstruct(r) - ref).abs().max()) <= tol * scale, r
        assert torch.equal(dec.reconstruct(r), up.double() @ down.double())
        obj = objective(W.double(), dec.reconstruct(r), B, A)
        assert obj == pytest.approx(2 * float(dec.predicted_loss[r]), rel=1e-4 if dtype == torch.float32 else 1e-8, abs=1e-9)
    # the returned factors are copies: editing them leaves the decomposition as it was
    up, down = dec.factors(5)
    up.zero_()
    down.zero_()
    assert torch.equal(dec.factors(5)[0], up_all[:, :5])


def test_roots_kept_as_diagnostics_and_recomputed_on_demand():
    from types import SimpleNamespace

    from gfwsvd_core.explore import own_weighted_error
    from gfwsvd_core.fisher.psd import root

    m, n = 12, 9
    g = torch.Generator().manual_seed(3)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    A = x @ x.T  # singular: the damping climbs
    B = spd(m, 3, cond=100)
    dec = decompose(W, B, A)
    assert dec.right.damping > 0 and dec.right.requested == 0 and not dec.right.fell_back
    assert dec.left.dim == m and dec.right.dim == n and not dec.left.diagonal
    assert torch.equal(dec.left.L, root(B).L) and torch.equal(dec.right.L, root(A).L)
    info = dec.result(3).info
    assert info["right_damping"] == dec.right.damping and info["left_fell_back"] is False
    # explore.own_weighted_error reads the roots: the weighted error of the optimum is its tail
    for r in (1, 4, 9):
        err = own_weighted_error(SimpleNamespace(decomposition=dec), W - dec.reconstruct(r))
        assert err == pytest.approx(2 * float(dec.predicted_loss[r]), rel=1e-8, abs=1e-10)
    diag = decompose(W, torch.rand(m, dtype=torch.float64) + 0.5)
    assert diag.left.diagonal and diag.left.L.shape == (m,) and diag.nbytes() <= 2 * m * n * 8 and diag.right is None
    zero = decompose(W, torch.zeros(m), A)
    assert zero.zero_weight and zero.left is None and zero.right is None
