"""Methods: registry, and each method optimal under its own weighted norm; predicted vs exact loss."""

import pytest
import torch

import tiny_models
from gfwsvd_core import available_methods, collect_statistics, decompose, get_method
from gfwsvd_core.fisher.diagonal import two_sided_diagonal
from gfwsvd_core.layers import get_weight
from gfwsvd_core.stats import LayerStats
from test_stats import lm_loss, make_batch


@pytest.fixture(scope="module")
def gpt2_stats():
    model = tiny_models.tiny_gpt2()
    batches = [make_batch(B=4, T=8, seed=s) for s in range(3)]
    return model, collect_statistics(model, batches, lm_loss)


def own_norm(w, dW):
    """||L_out^T dW L_in||^2 with the method's own (undamped) weights."""
    def as_mat(x, d):
        if x is None:
            return torch.eye(d, dtype=torch.float64)
        x = x.double()
        return torch.diag(x) if x.dim() == 1 else x
    B, A = as_mat(w.left, dW.shape[0]), as_mat(w.right, dW.shape[1])
    dW = dW.double()
    return float(torch.trace(dW.T @ B @ dW @ A))


def test_registry():
    assert available_methods()[:4] == ["svd", "fwsvd", "kfac", "gfwsvd"]
    with pytest.raises(ValueError, match="unknown method 'pca'; valid methods: svd, fwsvd, kfac, gfwsvd"):
        get_method("pca")
    with pytest.raises(ValueError, match="invalid options.*side"):
        get_method("fwsvd", sidee="in")
    with pytest.raises(ValueError, match="side must be"):
        get_method("fwsvd", side="left")
    assert get_method("SVD-LLM").name == "svdllm"


@pytest.mark.parametrize("name", ["fwsvd", "kfac", "gfwsvd", "asvd", "svdllm"])
def test_each_method_beats_svd_under_its_own_norm(gpt2_stats, name):
    model, stats = gpt2_stats
    method = get_method(name)
    for layer in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        W = get_weight(model.get_submodule(layer)).double()
        w = method.weights(stats[layer])
        mine = decompose(W, w.left, w.right, damping=w.damping)
        plain = decompose(W)
        for r in (1, 4, 16):
            e_mine = own_norm(w, W - mine.reconstruct(r))
            e_svd = own_norm(w, W - plain.reconstruct(r))
            assert e_mine <= e_svd * (1 + 1e-6), (layer, r)
            # predicted loss is half the own-norm error (up to the tiny relative damping)
            assert 2 * float(mine.predicted_loss[r]) == pytest.approx(e_mine, rel=1e-3)
        assert e_mine < e_svd  # strictly better somewhere: the weighting does something


def test_gfwsvd_predicted_loss_equals_exact_quadratic_on_planted_kronecker():
    """Planted Fisher that is exactly Kronecker: predicted (tail) loss == mean_k <G_k, dW>^2 / 2."""
    g = torch.Generator().manual_seed(0)
    m, n = 6, 5
    a = torch.randn(9, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    b = torch.randn(8, m, generator=g, dtype=torch.float64)
    G = torch.einsum("jm,in->ijmn", b, a).reshape(-1, m, n)  # all pairs: F = E[aa^T] (x) E[bb^T]
    st = LayerStats("planted", m, n, "sequence", num_samples=G.shape[0], G=G)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    w = get_method("gfwsvd", damping=0.0, init="identity", tol=1e-14, max_sweeps=300).weights(st)
    assert w.info["kronecker"]["fit_error"] < 1e-5
    dec = decompose(W, w.left, w.right)
    for r in range(1, 5):
        exact = st.quadratic(W - dec.reconstruct(r))
        assert float(dec.predicted_loss[r]) == pytest.approx(exact, rel=1e-6)


def test_predicted_vs_exact_quadratic_on_tiny_model(gpt2_stats):
    """On real gradients the Kronecker fit is approximate (few samples: eta ~ 0.1), so the
    predicted loss only has the right order of magnitude; but under the exact empirical-Fisher
    quadratic GFWSVD's truncation is far better than plain SVD's."""
    model, stats = gpt2_stats
    layer = "transformer.h.0.mlp.c_fc"
    W = get_weight(model.get_submodule(layer)).double()
    w = get_method("gfwsvd").weights(stats[layer])
    assert 0 < w.info["kronecker"]["eta"] < 0.5
    dec = decompose(W, w.left, w.right, damping=w.damping)
    svd = decompose(W)
    for r in (2, 8):
        pred = float(dec.predicted_loss[r])
        exact = stats[layer].quadratic(W - dec.reconstruct(r))
        assert 0.1 < pred / exact < 10.0
        assert exact < stats[layer].quadratic(W - svd.reconstruct(r))


def test_fwsvd_sides(gpt2_stats):
    _, stats = gpt2_stats
    st = stats["transformer.h.0.mlp.c_fc"]
    w_in = get_method("fwsvd").weights(st)
    w_out = get_method("fwsvd", side="out").weights(st)
    assert w_in.left is None and w_in.right.shape == (st.in_features,)
    assert w_out.right is None and w_out.left.shape == (st.out_features,)
    assert torch.allclose(w_in.right, st.diagonal_fisher.sum(0))


def test_two_sided_diagonal_is_the_best_rank_one_fit():
    r0, c0 = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(4, dtype=torch.float64) + 0.1
    fisher = torch.outer(r0, c0)
    r, c = two_sided_diagonal(fisher)
    assert torch.allclose(torch.outer(r, c), fisher, rtol=1e-8)
    noisy = fisher + 0.05 * torch.rand(5, 4, dtype=torch.float64)
    r, c = two_sided_diagonal(noisy)
    U, S, Vh = torch.linalg.svd(noisy)
    assert torch.allclose(torch.outer(r, c), S[0] * torch.outer(U[:, 0], Vh[0]), rtol=1e-6)


def test_methods_on_missing_statistics_say_what_to_collect():
    model = tiny_models.tiny_gpt2()
    st = collect_statistics(model, [make_batch()], lm_loss, kinds=("inputs",))
    layer = next(iter(st))
    with pytest.raises(ValueError, match="add 'diagonal' to kinds"):
        get_method("fwsvd").weights(st[layer])
    with pytest.raises(ValueError, match="add 'samples' to kinds"):
        get_method("gfwsvd").weights(st[layer])
    assert get_method("svdllm").weights(st[layer]).right.shape == (st[layer].in_features,) * 2


def test_gfwsvd_batch_on_solves_small_layers_together_and_matches_one_by_one(gpt2_stats, monkeypatch):
    """gfwsvd[batch=on] (the CUDA default, forced here on the CPU): decompose_layers prefetches the
    small layers' factors in batches and each layer's weights use them; the decompositions equal
    the one-by-one ones (float32 maps: to ~1e-6)."""
    from gfwsvd_core.compress import decompose_layers
    from gfwsvd_core.methods import gfwsvd as mod

    model, stats = gpt2_stats
    off = decompose_layers(model, stats, "gfwsvd[batch=off]")
    singles = []
    real = mod.nearest_kronecker
    monkeypatch.setattr(mod, "nearest_kronecker", lambda st, **kw: singles.append(st.name) or real(st, **kw))
    method = get_method("gfwsvd[batch=on]")
    on = decompose_layers(model, stats, method)
    assert singles == []  # every layer came from a batch (the tiny GPT-2's layers share shapes)
    assert method.__dict__["_prefetched"] == {}  # used up, nothing held after the run
    for name in stats:
        a, b = off[name].info["kronecker"], on[name].info["kronecker"]
        assert b["sweeps"] == a["sweeps"] and b["s1"] == pytest.approx(a["s1"], rel=1e-5)
        Wa = off[name].decomposition.reconstruct(4)
        Wb = on[name].decomposition.reconstruct(4)
        assert float((Wa - Wb).norm() / Wa.norm()) < 1e-4
    # "auto" batches on CUDA only: on this CPU every layer is solved by itself
    decompose_layers(model, stats, "gfwsvd")
    assert sorted(singles) == sorted(stats)
    with pytest.raises(ValueError, match="batch must be 'auto', 'on' or 'off'"):
        get_method("gfwsvd[batch=maybe]")
