"""Our Fisher-aligned view (fisher/violation.py): rho_KF against a dense brute force, subspace angles
against scipy, the explorer's table, the report's entry and the chart."""

import json
import math

import pytest
import scipy.linalg
import torch

import tiny_models
from gfwsvd_core import nearest_kronecker
from gfwsvd_core.fisher import violation
from gfwsvd_core.fisher.violation import alignment_summary, kfac_violation, subspace_angles
from gfwsvd_core.stats import LayerStats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def full_fisher(G: torch.Tensor) -> torch.Tensor:
    """F = 1/K sum vec(G) vec(G)^T with column-major vec (index j*m + i), as tests/test_kronecker.py."""
    K = G.shape[0]
    V = G.transpose(1, 2).reshape(K, -1).double()
    return V.T @ V / K


def vec(M: torch.Tensor) -> torch.Tensor:
    return M.T.reshape(-1)  # column-major


def random_samples(K=10, T=3, m=6, n=5, seed=0):
    """Correlated tokens and gradients, so that the Fisher is far from K-FAC's product."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(K, T, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    D = torch.randn(K, T, m, generator=g, dtype=torch.float64) * (1 + X[..., :1].abs())
    D[..., -1] = X[..., 0] * D[..., 0]
    return X, D


def make_stats(X, D, storage):
    K, T, n = X.shape
    m = D.shape[2]
    Xf, Df = X.reshape(-1, n), D.reshape(-1, m)
    kw = dict(G=torch.bmm(D.transpose(1, 2), X)) if storage == "materialized" else dict(X=X, D=D)
    return LayerStats("enc.l", out_features=m, in_features=n, sample_unit="sequence", num_samples=K,
                      num_tokens=K * T, xx_sum=Xf.T @ Xf, dd_sum=Df.T @ Df, **kw)


def brute_force(X, D):
    """Dense F and P = A0 (x) B0, the best c by least squares over vec(F), the relative residual."""
    st = make_stats(X, D, "materialized")
    F = full_fisher(st.G)
    P = torch.kron(st.kfac_in, st.kfac_out)  # (A (x) B) vec(G) = vec(B G A^T): the column-major pairing
    c = torch.linalg.lstsq(P.reshape(-1, 1), F.reshape(-1, 1)).solution.item()
    rho = float(torch.linalg.norm(F - c * P) / torch.linalg.norm(F))
    return rho, c, F, P, st


# T = 3: the factored T x T route; T = 20 (> m, n): the factored samples are multiplied out in chunks
@pytest.mark.parametrize("storage,T", [("materialized", 3), ("factored", 3), ("factored", 20)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rho_matches_dense_brute_force(storage, T, seed):
    X, D = random_samples(T=T, m=4 + seed, n=7 - seed, seed=seed)
    rho, c, F, P, _ = brute_force(X, D)
    v = kfac_violation(make_stats(X, D, storage))
    assert v["rho"] == pytest.approx(rho, rel=1e-10)
    assert v["scale"] == pytest.approx(c, rel=1e-10)
    assert v["inner"] == pytest.approx(float((F * P).sum()), rel=1e-10)
    assert v["fisher_norm"] == pytest.approx(float(torch.linalg.norm(F)), rel=1e-10)
    assert v["kfac_norm"] == pytest.approx(float(torch.linalg.norm(P)), rel=1e-10)
    assert 0.2 < rho < 1  # a case where the assumption really fails, so the comparison has teeth
    # the other Kronecker order would be a different (wrong) number here (m != n)
    Pswap = torch.kron(make_stats(X, D, "materialized").kfac_out, make_stats(X, D, "materialized").kfac_in)
    cs = float((F * Pswap).sum() / (Pswap * Pswap).sum())
    assert abs(float(torch.linalg.norm(F - cs * Pswap) / torch.linalg.norm(F)) - rho) > 1e-3


def test_rho_is_chunk_independent_and_float32_close():
    X, D = random_samples(T=20, seed=3)
    ref = kfac_violation(make_stats(X, D, "factored"))["rho"]
    for storage in ("factored", "materialized"):
        assert kfac_violation(make_stats(X, D, storage), budget_bytes=1)["rho"] == pytest.approx(ref, rel=1e-10)
        st = make_stats(X.float(), D.float(), storage)
        assert kfac_violation(st, dtype=torch.float32)["rho"] == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("storage", ["materialized", "factored"])
def test_planted_kfac_fisher_has_zero_violation(storage):
    # one datum (K = 1, one token): F = (x x^T) (x) (d d^T) exactly
    X, D = random_samples(K=1, T=1, seed=4)
    v = kfac_violation(make_stats(X, D, storage))
    assert v["rho"] < 1e-6 and v["scale"] == pytest.approx(1.0, rel=1e-10)
    # one-token samples pairing every x_i with every d_j: F = mean(x x^T) (x) mean(d d^T) = A0 (x) B0
    g = torch.Generator().manual_seed(5)
    x, d = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    X = x[:, None, :].expand(6, 7, 5).reshape(-1, 1, 5)
    D = d[None, :, :].expand(6, 7, 4).reshape(-1, 1, 4)
    st = make_stats(X, D, storage)
    v = kfac_violation(st)
    assert v["rho"] < 1e-6 and v["scale"] == pytest.approx(1.0, rel=1e-10)
    assert nearest_kronecker(st.G if st.G is not None else (st.X, st.D), tol=1e-12).fit_error < 1e-6
    # and K-FAC's prediction of any quadratic is then exact
    dW = torch.randn(4, 5, generator=g, dtype=torch.float64)
    rec = alignment_summary(st, dW=dW)
    assert rec["quadratic_ratio"] == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_rho_is_never_below_the_nkp_fit_error(seed):
    X, D = random_samples(K=12, T=4, seed=10 + seed)
    st = make_stats(X, D, "factored")
    nkp = nearest_kronecker((X, D), tol=1e-12, max_sweeps=500)
    rho = kfac_violation(st)["rho"]
    assert rho >= nkp.fit_error - 1e-9
    assert rho > nkp.fit_error + 1e-3  # correlated tokens: K-FAC is strictly worse than the best product


def test_quadratic_ratio_matches_dense():
    X, D = random_samples(seed=6)
    rho, c, F, P, st = brute_force(X, D)
    dW = torch.randn(st.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rec = alignment_summary(st, dW=dW)
    exact = 0.5 * float(vec(dW) @ F @ vec(dW))
    kfac = 0.5 * c * float(vec(dW) @ P @ vec(dW))
    assert rec["kfac_quadratic"] == pytest.approx(kfac, rel=1e-10)
    assert rec["quadratic_ratio"] == pytest.approx(exact / kfac, rel=1e-10)
    assert rec["rho_kfac"] == pytest.approx(rho, rel=1e-10)


def test_violation_is_cached_and_needs_samples(monkeypatch):
    X, D = random_samples(seed=8)
    st = make_stats(X, D, "factored")
    first = kfac_violation(st)
    monkeypatch.setattr(violation, "_kfac_inner", lambda *a, **k: pytest.fail("recomputed"))
    assert kfac_violation(st) == first
    bare = LayerStats("enc.l", 6, 5, "sequence", num_samples=3, num_tokens=3, xx_sum=torch.eye(5),
                      dd_sum=torch.eye(6))
    with pytest.raises(ValueError, match="add 'samples'"):
        kfac_violation(bare)


def random_psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    return M @ M.T


def test_subspace_angles_identical_orthogonal_and_scipy():
    n, k = 9, 3
    A = random_psd(n, 0)
    s = subspace_angles(A, 2.5 * A, k)  # the same eigenvectors whatever the scale
    assert s["cosines"] == pytest.approx([1.0] * k, abs=1e-10) and s["overlap"] == pytest.approx(1.0, abs=1e-10)
    assert s["chance"] == pytest.approx(k / n) and s["k"] == k and s["n"] == n
    Q = torch.linalg.qr(random_psd(n, 1))[0]
    e = torch.arange(n, 0, -1, dtype=torch.float64)
    A1 = (Q * e) @ Q.T  # top-k eigenvectors: Q[:, :k]
    A2 = (Q * torch.flip(e, [0])) @ Q.T  # top-k eigenvectors: Q[:, -k:], orthogonal to those
    s = subspace_angles(A1, A2, k)
    assert s["cosines"] == pytest.approx([0.0] * k, abs=1e-10) and s["overlap"] == pytest.approx(0.0, abs=1e-10)
    for seed in range(3):
        A1, A2 = random_psd(n, 10 + seed), random_psd(n, 20 + seed)
        s = subspace_angles(A1, A2, k)
        Q1 = torch.linalg.eigh(A1)[1][:, -k:].numpy()
        Q2 = torch.linalg.eigh(A2)[1][:, -k:].numpy()
        want = sorted(math.cos(a) for a in scipy.linalg.subspace_angles(Q1, Q2))[::-1]
        assert s["cosines"] == pytest.approx(want, abs=1e-10)
        assert s["cosines"] == sorted(s["cosines"], reverse=True)
        assert s["overlap"] == pytest.approx(sum(c * c for c in want) / k, abs=1e-10)
    assert subspace_angles(A1, A2, n)["overlap"] == pytest.approx(1.0)  # the whole space
    with pytest.raises(ValueError, match="k must be"):
        subspace_angles(A1, A2, 0)
    with pytest.raises(ValueError, match="square"):
        subspace_angles(A1, A2[:4, :4], 2)


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    from gfwsvd_core import pipeline

    folder = tiny_models.save_tiny(tiny_models.tiny_bert(), tmp_path_factory.mktemp("model"))
    exp = pipeline.prepare(model=str(folder), samples=16, eval_samples=8, max_length=24, batch_size=4, device="cpu")
    pipeline.collect(exp, ["svd", "gfwsvd"])
    return exp, pipeline.decompositions(exp, "gfwsvd")


def test_alignment_table_end_to_end_on_tiny_bert(tiny_experiment):
    from gfwsvd_core.explore import fisher_alignment_table
    from gfwsvd_core.layers import get_weight
    from gfwsvd_core.ranks import rank_for_ratio

    exp, decs = tiny_experiment
    rows = fisher_alignment_table(decs, exp.stats, exp.model)
    assert [r["layer"] for r in rows] == list(decs)
    for r in rows:
        d, st = decs[r["layer"]], exp.stats[r["layer"]]
        m, n = d.shape
        assert r["k"] == min(rank_for_ratio(m, n, 0.5), n) and r["chance_overlap"] == pytest.approx(r["k"] / n)
        assert 0 <= r["rho_kfac"] <= 1 and 0 <= r["overlap"] <= 1
        assert r["nkp_fit_error"] == d.info["kronecker"]["fit_error"]
        assert r["rho_kfac"] >= r["nkp_fit_error"] - 1e-3  # GFWSVD's float32 solve resolves ~3e-4
        s = subspace_angles(d.factors[0], st.kfac_in, r["k"])
        assert r["overlap"] == pytest.approx(s["overlap"])
        W = get_weight(exp.model.get_submodule(r["layer"])).double()
        dW = W - d.decomposition.reconstruct(r["k"])
        A0, B0 = st.kfac_in.double(), st.kfac_out.double()
        kfac = 0.5 * r["kfac_scale"] * float(((B0 @ dW) * (dW @ A0)).sum())
        assert r["quadratic_ratio"] == pytest.approx(st.quadratic(dW) / kfac, rel=1e-4)
    # the smallest layer against the dense Fisher of its stored samples
    name = min(decs, key=lambda n: math.prod(decs[n].shape))
    st = exp.stats[name]
    G = torch.cat(list(st.per_sample_gradients())).double()
    F = full_fisher(G)
    P = torch.kron(st.kfac_in.double(), st.kfac_out.double())
    c = float((F * P).sum() / (P * P).sum())
    row = next(r for r in rows if r["layer"] == name)
    assert row["rho_kfac"] == pytest.approx(float(torch.linalg.norm(F - c * P) / torch.linalg.norm(F)), rel=1e-4)
    assert row["kfac_scale"] == pytest.approx(c, rel=1e-4)
    # without the model: no truncation, the same rest
    plain = fisher_alignment_table(decs, exp.stats)
    assert "quadratic_ratio" not in plain[0] and plain[0]["rho_kfac"] == rows[0]["rho_kfac"]
    # decompositions without GFWSVD's factors are left out
    assert fisher_alignment_table(pipeline_decs(exp, "svd"), exp.stats) == []


def pipeline_decs(exp, method):
    from gfwsvd_core import pipeline

    return pipeline.decompositions(exp, method)


def test_report_carries_the_alignment_of_each_layer(tiny_experiment):
    from gfwsvd_core.compress import compress
    from gfwsvd_core.evaluate import layer_report

    exp, decs = tiny_experiment
    names = list(decs)
    ranks = {n: 2 for n in names}
    ranks[names[1]] = None  # one dense layer
    comp = compress(exp.model, exp.stats, "gfwsvd", ranks=ranks, decompositions=decs)
    recs = layer_report(exp.model, comp, exp.stats)
    json.dumps(recs)  # JSON-ready
    for rec in recs:
        fa = rec["fisher_alignment"]
        st = exp.stats[rec["layer"]]
        assert fa["rho_kfac"] == pytest.approx(kfac_violation(st)["rho"])
        assert fa["nkp_fit_error"] == decs[rec["layer"]].info["kronecker"]["fit_error"]
        assert "overlap" not in fa  # the eigendecompositions are left to the factors page (cost)
        if rec["rank"] is None:  # dense: no truncation to compare
            assert "quadratic_ratio" not in fa
        else:
            assert fa["quadratic_ratio"] == pytest.approx(rec["exact_quadratic"] / fa["kfac_quadratic"])
    # on request (the explorer's table), the overlap at the kept rank
    from gfwsvd_core.evaluate import fisher_alignment
    from gfwsvd_core.layers import get_weight

    n0 = names[0]
    fa = fisher_alignment(exp.stats[n0], decs[n0], 2, get_weight(exp.model.get_submodule(n0)), angles=True)
    assert fa["k"] == 2 and 0 <= fa["overlap"] <= 1
    # another method: rho only (no GFWSVD factors); without samples: no entry
    comp = compress(exp.model, exp.stats, "svd", ratio=0.5, decompositions=pipeline_decs(exp, "svd"))
    fa = layer_report(exp.model, comp, exp.stats)[0]["fisher_alignment"]
    assert "rho_kfac" in fa and "overlap" not in fa and "nkp_fit_error" not in fa
    bare = {n: LayerStats(n, *s.shape, s.sample_unit, num_samples=s.num_samples, num_tokens=s.num_tokens,
                          xx_sum=s.xx_sum, dd_sum=s.dd_sum) for n, s in exp.stats.items()}
    assert all("fisher_alignment" not in r for r in layer_report(exp.model, comp, bare))


def test_chart_draws_each_series_per_layer():
    from gfwsvd_ui import charts

    rows = [{"rho_kfac": 0.8, "nkp_fit_error": 0.5, "overlap": 0.4, "chance_overlap": 0.25},
            {"rho_kfac": 0.6, "nkp_fit_error": 0.3, "overlap": 0.7, "chance_overlap": 0.25}]
    fig = charts.fisher_alignment_chart(rows, ["L0 a", "L0 b"])
    ys = {t.name.split(":")[0].split(" (")[0]: list(t.y) for t in fig.data}
    assert len(fig.data) == 4 and list(fig.data[0].x) == ["L0 a", "L0 b"]
    assert ys["ρ_KF"] == [0.8, 0.6] and "ours" in fig.layout.title.text
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert len(charts.fisher_alignment_chart([{"rho_kfac": 0.8}], ["x"]).data) == 1  # what is missing is not drawn
