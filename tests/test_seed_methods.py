"""The seed's remaining methods and options: method specs, the closed-form update, SVD-LLM V2's
eigen-root and rank allocation, and sequential calibration, each against a float64 brute force."""

import math

import pytest
import torch

import tiny_models
from gfwsvd_core import pipeline
from gfwsvd_core.compress import decompose_layers
from gfwsvd_core.errors import ConfigurationError
from gfwsvd_core.factorized import LowRankLinear, replace_layer
from gfwsvd_core.io import load_compressed, save_compressed
from gfwsvd_core.layers import get_weight
from gfwsvd_core.methods import get_method, method_key, method_label, parse_spec, split_methods
from gfwsvd_core.ranks import matrix_type, rank_for_ratio, uniform_ranks, v2_ranks
from gfwsvd_core.solver import decompose
from gfwsvd_core.stats import collect_statistics
from gfwsvd_core.update import closed_form_update, output_errors


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


def _layer(m, n, tokens, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -spread, n, dtype=torch.float64)  # correlated, wide-spectrum inputs
    X = (torch.randn(n, n, generator=g, dtype=torch.float64) * scales) @ torch.randn(n, tokens, generator=g,
                                                                                     dtype=torch.float64)
    return W, X


# --- specs


def test_specs_round_trip_and_bad_specs_are_clear():
    assert parse_spec("svdllm[root=eigen, update=true]") == ("svdllm", {"root": "eigen", "update": True})
    assert split_methods("svd, svd[update=true,allocation=v2],auto[candidates=svd+kfac]") == [
        "svd", "svd[update=true,allocation=v2]", "auto[candidates=svd+kfac]"]
    for spec in ("svd", "svd[update=true]", "gfwsvd[damping=0.5,sequential=true]", "svdllm[root=eigen]",
                 "auto[candidates=svd+kfac]", "kfac[allocation=budget]"):
        key = method_key(spec)
        assert method_key(key) == key and get_method(key) == get_method(spec)
    assert method_key("svdllm[root=eigen,allocation=v2]") == "svdllm[allocation=v2,root=eigen]"
    assert method_key("svdllm2") == "svdllm2" and get_method("svdllm2").root == "eigen"
    assert method_label("svd[update=true,allocation=v2]") == "SVD + update + v2 ranks"
    assert get_method("auto").allocation == "budget"  # auto's curves share one yardstick
    with pytest.raises(ConfigurationError, match="key=value"):
        get_method("svd[update]")
    with pytest.raises(ConfigurationError, match="must end with"):
        get_method("svd[update=true")
    with pytest.raises(ConfigurationError, match="allocation must be one of uniform, budget, v2"):
        get_method("svd[allocation=greedy]")
    with pytest.raises(ConfigurationError, match="update must be true or false"):
        get_method("svd[update=1]")
    with pytest.raises(ConfigurationError, match="root must be one of"):
        get_method("svdllm[root=qr]")
    with pytest.raises(ConfigurationError, match="auto cannot compress sequentially"):
        get_method("auto[sequential=true]")
    assert get_method("svd[update=true]").kinds() == ("inputs",)


# --- the closed-form update


@pytest.mark.parametrize("m,n", [(9, 6), (5, 8)])
@pytest.mark.parametrize("method", ["svd", "fwsvd_like"])
def test_update_is_the_least_squares_optimum_at_every_rank(m, n, method):
    W, X = _layer(m, n, tokens=40)
    C = X @ X.T
    g = torch.Generator().manual_seed(1)
    left = None if method == "svd" else torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    dec = decompose(W, left, None)
    upd = closed_form_update(dec, W, C, damping=0.0)
    WX = W @ X
    for r in range(1, min(m, n) + 1):
        _, down = dec.factors(r)
        Z = down.double() @ X  # (r, tokens): the kept input directions applied to the inputs
        U = torch.linalg.lstsq(Z.T, WX.T).solution.T  # min_U ||W X - U Z||
        torch.testing.assert_close(upd.reconstruct(r), U @ down.double(), rtol=1e-7, atol=1e-9)
        # never worse than the truncation it updates, on the calibration outputs
        e_upd, e_base = output_errors(upd, W, C, [r])[0], output_errors(dec, W, C, [r])[0]
        assert e_upd <= e_base + 1e-12
    assert output_errors(upd, W, C, [1])[0] < output_errors(dec, W, C, [1])[0] - 1e-6  # it does change SVD


def test_update_changes_nothing_for_svdllm():
    W, X = _layer(8, 6, tokens=30)
    C = X @ X.T
    dec = decompose(W, None, C, damping=1e-6)
    upd = closed_form_update(dec, W, C)  # same relative damping as SVD-LLM's root: the same whitened problem
    for r in range(1, 7):
        torch.testing.assert_close(upd.reconstruct(r), dec.reconstruct(r), rtol=1e-7, atol=1e-9)


def test_update_with_a_singular_gram_is_defined_and_optimal_on_the_data():
    W, X = _layer(7, 10, tokens=4)  # 4 tokens, 10 inputs: C has rank 4
    C = X @ X.T
    upd = closed_form_update(decompose(W), W, C)
    assert torch.isfinite(upd.reconstruct(7)).all()
    # at rank 4 the kept directions can carry all the data: outputs on the calibration inputs are exact
    assert output_errors(upd, W, C, [4])[0] < 1e-4


# --- SVD-LLM V2: the eigen-root and the allocation


def _best_output_error(W, X, r):
    """min over rank-r W_r of ||(W - W_r) X||_F: U_r U_r^T W with U_r the top eigenvectors of W C W^T."""
    U = torch.linalg.eigh(W @ X @ X.T @ W.T)[1].flip(1)[:, :r]
    return float(((W - U @ U.T @ W) @ X).norm())


def test_eigen_root_gives_svdllms_optimum():
    W, X = _layer(8, 6, tokens=30, spread=1.0)  # well conditioned: damping and floor both negligible
    C = X @ X.T
    chol = decompose(W, None, C, damping=0.0)
    eig = decompose(W, None, C, damping=0.0, root_kind="eigen")
    damped = decompose(W, None, C, damping=1e-6)  # Cholesky's damping shifts every eigenvalue, the floor none here
    for r in range(1, 7):
        torch.testing.assert_close(eig.reconstruct(r), chol.reconstruct(r), rtol=1e-10, atol=1e-12)
        out = float(((W - eig.reconstruct(r)) @ X).norm())
        assert out <= float(((W - damped.reconstruct(r)) @ X).norm()) + 1e-12
        assert float(((W - eig.reconstruct(r)) @ X).norm()) <= _best_output_error(W, X, r) * (1 + 1e-6) + 1e-12


def test_eigen_root_on_a_singular_gram_keeps_the_data_directions():
    W, X = _layer(8, 10, tokens=5)  # rank-5 Gram
    C = X @ X.T
    eig = decompose(W, None, C, damping=1e-6, root_kind="eigen")
    assert eig.right.kind == "eigen" and eig.right.floored == 5  # five eigenvalues raised to the floor
    chol = decompose(W, None, C, damping=1e-6)
    scale = float((W @ X).norm())
    for r in (1, 3, 5):
        best = _best_output_error(W, X, r)
        got = float(((W - eig.reconstruct(r)) @ X).norm())
        assert got - best <= 1e-5 * scale  # the floored directions cost at most the floor's share
        assert got <= float(((W - chol.reconstruct(r)) @ X).norm()) * (1 + 1e-2)  # no worse than damped Cholesky


def test_v2_ranks_against_a_direct_computation():
    shapes = {"b.0.q": (32, 32), "b.1.q": (32, 32), "b.2.q": (32, 32), "b.0.f": (64, 16), "b.1.f": (64, 16)}
    # tail-energy-like curves: 1/2 sum_{i>r} s_i^2 with per-layer scales (q: losses > 1; f: < 1 -> log1p)
    scale = {"b.0.q": 40.0, "b.1.q": 10.0, "b.2.q": 90.0, "b.0.f": 0.1, "b.1.f": 0.4}
    curves = {}
    for n, (m, k) in shapes.items():
        s = scale[n] * torch.linspace(1, 0.01, min(m, k), dtype=torch.float64)
        sq = s ** 2
        tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
        curves[n] = 0.5 * tail
    ratio = 0.4
    got = v2_ranks(curves, shapes, ratio)
    uni = uniform_ranks(shapes, ratio)
    for group, f in ((["b.0.q", "b.1.q", "b.2.q"], math.log), (["b.0.f", "b.1.f"], math.log1p)):
        L = [math.sqrt(2 * float(curves[n][uni[n]])) for n in group]
        w = [1 / f(x) for x in L]
        for n, wi in zip(group, w):
            R = len(group) * (1 - ratio) * wi / sum(w)
            assert got[n] == rank_for_ratio(*shapes[n], 1 - R), n
    assert got["b.2.q"] > got["b.0.q"] > got["b.1.q"]  # higher truncation loss, less compression
    assert matrix_type("encoder.layer.11.attention.self.query") == "encoder.layer.*.attention.self.query"
    assert v2_ranks(curves, shapes, 1.0) == {n: None for n in shapes}


# --- end to end on a tiny BERT: sequential calibration, export and reload, sweep keys


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    folder = tiny_models.save_tiny(tiny_models.tiny_bert(), tmp_path_factory.mktemp("m") / "bert")
    e = pipeline.prepare(model=str(folder), samples=16, eval_samples=8, max_length=24, batch_size=4, device="cpu")
    pipeline.collect(e, ["svdllm", "kfac", "gfwsvd"])
    return e


def test_sequential_collects_each_block_on_the_compressed_model(exp):
    blocks = pipeline.blocks_of(exp.layers)
    assert len(blocks) == 2 and all(n.startswith("encoder.layer.0.") for n in blocks[0])
    method = "kfac[sequential=true]"
    comp, rep = pipeline.run_compression(exp, method, ratio=0.4)
    assert rep["method_key"] == "kfac[sequential=true]" and "sequential_compress" in rep["stages"]
    ranks = comp.ranks
    # block 0 sees the dense model: the same factors as one pass
    one = pipeline.decompositions(exp, "kfac")
    for n in blocks[0]:
        torch.testing.assert_close(comp.decompositions[n].decomposition.reconstruct(ranks[n]),
                                   one[n].decomposition.reconstruct(ranks[n]), rtol=1e-6, atol=1e-8)
    # block 1 by hand: compress block 0 with its factors, collect block 1's statistics on that model
    manual = pipeline.build_compressed(exp.model, one, {n: ranks[n] for n in blocks[0]})
    gen = torch.Generator().manual_seed(int(exp.settings["seed"]))
    stats = collect_statistics(manual, exp.calib_batches,
                               lambda mdl, b: exp.task.fisher_loss(mdl, b, fisher="empirical", generator=gen),
                               layers=blocks[1], kinds=("kfac",), sample_unit=exp.sample_unit)
    hand = decompose_layers(manual, stats, "kfac")
    changed = 0
    for n in blocks[1]:
        got = comp.decompositions[n].decomposition.reconstruct(ranks[n])
        torch.testing.assert_close(got, hand[n].decomposition.reconstruct(ranks[n]), rtol=1e-5, atol=1e-7)
        changed += not torch.allclose(got, one[n].decomposition.reconstruct(ranks[n]), rtol=1e-4, atol=1e-6)
        replace_layer(manual, n, LowRankLinear.replacing(manual.get_submodule(n), *hand[n].decomposition.factors(ranks[n])))
    assert changed > 0  # the upstream compression did change block 1's statistics
    batch = exp.eval_batches[0]
    torch.testing.assert_close(comp.model(**batch).last_hidden_state, manual(**batch).last_hidden_state,
                               rtol=1e-5, atol=1e-6)
    assert exp.model.encoder.layer[0].attention.self.query.__class__.__name__ == "Linear"  # input untouched


@pytest.mark.parametrize("method", ["svdllm2", "svd[update=true]", "gfwsvd[update=true]", "svdllm[sequential=true]",
                                    "kfac[allocation=v2]"])
def test_each_new_method_exports_and_reloads_exactly(exp, tmp_path, method):
    comp, rep = pipeline.run_compression(exp, method, ratio=0.5)
    assert rep["method_key"] == method_key(method) and rep["metrics"]
    out = save_compressed(comp.model, tmp_path / "m", tokenizer=exp.bundle.tokenizer, method=comp.method)
    loaded = load_compressed(out)
    batch = exp.eval_batches[0]
    torch.testing.assert_close(loaded(**batch).last_hidden_state, comp.model(**batch).last_hidden_state)


def test_update_lowers_every_layers_output_error_in_a_compression(exp):
    base = pipeline.decompositions(exp, "kfac")
    upd = pipeline.decompositions(exp, "kfac[update=true]")
    for n, d in base.items():
        W, C, r = get_weight(exp.model.get_submodule(n)), exp.stats[n].input_gram, rank_for_ratio(*d.shape, 0.3)
        assert output_errors(upd[n].decomposition, W, C, [r])[0] <= output_errors(d.decomposition, W, C, [r])[0] + 1e-7
        assert upd[n].info["update"]["damping"] > 0


def test_sweep_rows_are_keyed_by_spec_and_follow_the_allocation(exp):
    rep = pipeline.run_sweep(exp, ["kfac", "kfac[allocation=v2]", "svdllm[sequential=true]"], [0.4])
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {"dense", "kfac", "kfac[allocation=v2]", "svdllm[sequential=true]"}
    assert rows["kfac"]["metrics"] != rows["kfac[allocation=v2]"]["metrics"]
