"""evaluate.py: per-layer records (predicted / exact quadratic / measured) and sweeps."""

import copy
import functools

import pytest
import torch

import tiny_models
from gfwsvd_core import collect_statistics
from gfwsvd_core import evaluate as ev
from gfwsvd_core.compress import compress, decompose_layers
from gfwsvd_core.data import default_passages
from gfwsvd_core.factorized import LowRankLinear, replace_layer
from gfwsvd_core.layers import get_weight
from gfwsvd_core.models import default_layers
from gfwsvd_core.stats import ALL_KINDS
from gfwsvd_core.tasks import get_task


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


@functools.lru_cache(maxsize=None)
def _setup(task_name):
    if task_name == "causal-lm":
        model = tiny_models.tiny_gpt2()
    else:
        model = tiny_models.tiny_bert()
    tok = tiny_models.tokenizer()
    task = get_task(task_name)
    texts = default_passages()
    calib = task.make_batches(tok, texts[:12], max_length=32, batch_size=4)
    evaluation = task.make_batches(tok, texts[100:116], max_length=32, batch_size=8)

    def loss_fn(m, b):
        return task.fisher_loss(m, b)

    stats = collect_statistics(model, calib, loss_fn, layers=default_layers(model), kinds=ALL_KINDS,
                               sample_unit=task.default_sample_unit)
    return model, task, calib, evaluation, stats


def setup(task_name="causal-lm"):
    model, task, calib, evaluation, stats = _setup(task_name)
    return copy.deepcopy(model), task, calib, evaluation, stats


def test_layer_report_fields_and_values():
    model, task, calib, _, stats = setup()
    names = list(stats)
    ranks = {n: 4 for n in names}
    ranks[names[1]] = None  # one dense layer
    comp = compress(model, stats, "gfwsvd", ranks=ranks)
    recs = ev.layer_report(model, comp, stats, task, calib, measure=False)
    assert [r["layer"] for r in recs] == names
    for rec in recs:
        for key in ("layer", "shape", "rank", "dense", "params_before", "params_after", "predicted_loss",
                    "exact_quadratic", "relative_error"):
            assert key in rec, key
        assert "measured_increase" not in rec
        name, r = rec["layer"], rec["rank"]
        m, n = stats[name].shape
        assert rec["shape"] == [m, n] and rec["params_before"] == m * n
        if r is None:
            assert rec["exact_quadratic"] == 0.0 and rec["relative_error"] == 0.0 and rec["predicted_loss"] == 0.0
            continue
        assert rec["params_after"] == r * (m + n)
        dec = comp.decompositions[name].decomposition
        W = get_weight(model.get_submodule(name)).double()
        dW = W - dec.reconstruct(r)
        assert rec["relative_error"] == pytest.approx(float(dW.norm() / W.norm()), rel=1e-9)
        assert rec["predicted_loss"] == pytest.approx(0.5 * float((dec.S[r:].double() ** 2).sum()), rel=1e-9)
        # exact quadratic: mean_k <G_k, dW>^2 / 2 from the per-sample gradients, in float64
        G = torch.cat(list(stats[name].per_sample_gradients())).double()  # (K, m, n)
        ref = 0.5 * float((((G * dW).sum((1, 2))) ** 2).mean())
        assert rec["exact_quadratic"] == pytest.approx(ref, rel=1e-3, abs=1e-12)
        assert rec["exact_quadratic"] > 0


def test_layer_report_measured_increase():
    model, task, calib, _, stats = setup()
    comp = compress(model, stats, "kfac", ratio=0.5)
    recs = ev.layer_report(model, comp, stats, task, calib, measure=True)
    base = task.measured_loss(model, calib)
    for rec in recs[:3]:
        name = rec["layer"]
        one = copy.deepcopy(model)
        up, down = comp.decompositions[name].decomposition.factors(rec["rank"])
        replace_layer(one, name, LowRankLinear.replacing(one.get_submodule(name), up, down))
        assert rec["measured_increase"] == pytest.approx(task.measured_loss(one, calib) - base, rel=1e-5, abs=1e-7)
    assert all("measured_increase" in r for r in recs)
    # the original model is untouched by the per-layer measurements
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with pytest.raises(ValueError, match="task"):
        ev.layer_report(model, comp, stats, None, None, measure=True)


def test_measured_matches_quadratic_for_small_changes():
    # near full rank, the measured loss change is dominated by first + second order terms; the
    # exact quadratic and the first-order term <E[G], dW> together should predict it well
    model, task, calib, _, stats = setup()
    name = next(n for n in stats if stats[n].shape[0] == stats[n].shape[1])
    comp = compress(model, stats, "gfwsvd", ranks={name: 15})
    rec = ev.layer_report(model, comp, stats, task, calib, measure=True)[0]
    W = get_weight(model.get_submodule(name)).double()
    dW = comp.decompositions[name].decomposition.reconstruct(15) - W
    linear = float((stats[name].grad_mean * dW).sum())
    # measured_loss is the mean per-sample loss: its change is mean_k <G_k, dW> + O(dW^2)
    assert rec["measured_increase"] == pytest.approx(linear + rec["exact_quadratic"], rel=0.3, abs=1e-6)


def test_exact_quadratic_none_without_samples():
    model, task, calib, _, _ = setup()
    stats = collect_statistics(model, calib, lambda m, b: task.fisher_loss(m, b), layers=default_layers(model),
                               kinds=("kfac",))
    comp = compress(model, stats, "kfac", ratio=0.5)
    recs = ev.layer_report(model, comp, stats)
    assert all(r["exact_quadratic"] is None for r in recs)
    recs = ev.layer_report(model, comp, None)
    assert all(r["exact_quadratic"] is None for r in recs)


def test_evaluate_pair():
    model, task, _, evaluation, stats = setup("retrieval")
    comp = compress(model, stats, "svd", ratio=0.3)
    base, new = ev.evaluate_pair(task, model, comp.model, evaluation)
    assert set(base) == set(new) == {"loss", "top1", "mrr", "fidelity"}
    assert base["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert new["fidelity"] < 1.0


@pytest.mark.parametrize("task_name", ["causal-lm", "retrieval"])
def test_sweep_rows_and_reuse(task_name, monkeypatch):
    model, task, _, evaluation, stats = setup(task_name)
    calls = []
    real = ev.decompose_layers

    def counting(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "decompose_layers", counting)
    methods, ratios = ["svd", "GFWSVD"], [0.3, 0.6, 1.0]
    rows = ev.sweep(model, stats, task, evaluation, methods, ratios)
    assert len(calls) == len(methods)  # one decomposition pass per method, not per ratio
    assert len(rows) == 1 + len(methods) * len(ratios)
    dense = rows[0]
    assert dense["method"] == "dense" and dense["ratio"] == 1.0 and dense["kept_layers"] == 1.0
    baseline = task.evaluate(model, evaluation, task.reference_outputs(model, evaluation))
    assert dense["metrics"] == pytest.approx(baseline)
    got = [(r["method"], r["ratio"]) for r in rows[1:]]
    assert got == [(m, r) for m in ("svd", "gfwsvd") for r in ratios]
    for row in rows[1:]:
        assert set(row["metrics"]) == set(baseline)
        assert row["kept_layers"] <= row["ratio"] + 1e-12
        assert 0 < row["kept_model"] <= 1
        if row["ratio"] == 1.0:
            assert row["kept_layers"] == 1.0 and row["metrics"] == pytest.approx(baseline)
        else:
            assert row["kept_layers"] > row["ratio"] - 0.1
    # compressing at the same ratio directly gives the sweep's metrics
    comp = compress(model, stats, "svd", ratio=0.3)
    direct = task.evaluate(comp.model, evaluation, task.reference_outputs(model, evaluation))
    assert rows[1]["metrics"] == pytest.approx(direct)
    # given decompositions (keyed by canonical name) are reused: no new decomposition at all
    calls.clear()
    decs = {"svd": real(model, stats, "svd"), "gfwsvd": real(model, stats, "gfwsvd")}
    rows2 = ev.sweep(model, stats, task, evaluation, ["svd", "GFWSVD"], [0.3], decompositions=decs)
    assert calls == []
    assert rows2[1]["metrics"] == pytest.approx(rows[1]["metrics"])
    # the model is untouched
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_sweep_errors():
    model, task, _, evaluation, stats = setup()
    for bad in ([0.0], [1.5], [-1]):
        with pytest.raises(ValueError, match="ratio"):
            ev.sweep(model, stats, task, evaluation, ["svd"], bad)
    with pytest.raises(ValueError, match="ratio"):
        ev.sweep(model, stats, task, evaluation, ["svd"], [])
    with pytest.raises(ValueError, match="method"):
        ev.sweep(model, stats, task, evaluation, [], [0.5])
    with pytest.raises(ValueError, match="unknown method"):
        ev.sweep(model, stats, task, evaluation, ["svd", "nope"], [0.5])


def test_sweep_cancel():
    import threading

    from gfwsvd_core.stats import Cancelled

    model, task, _, evaluation, stats = setup()
    decs = {"svd": decompose_layers(model, stats, "svd")}
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        ev.sweep(model, stats, task, evaluation, ["svd"], [0.5], decompositions=decs, cancel=stop)


def test_measured_increase_shares_the_untouched_tensors(monkeypatch):
    """One layer's measurement must not copy the model's other tensors (it used to deep-copy it all)."""
    from torch import nn

    model, task, calib, _, stats = setup()
    comp = compress(model, stats, "svd", ratio=0.5)
    name = next(iter(comp.decompositions))
    copied = []
    deepcopy = nn.Parameter.__deepcopy__
    monkeypatch.setattr(nn.Parameter, "__deepcopy__", lambda self, memo: copied.append(self.shape) or deepcopy(self, memo))
    base = task.measured_loss(model, calib)
    got = ev.measured_increase(model, task, calib, comp.decompositions[name], 2, base)
    assert copied == []
    one = copy.deepcopy(model)
    up, down = comp.decompositions[name].decomposition.factors(2)
    replace_layer(one, name, LowRankLinear.replacing(one.get_submodule(name), up, down))
    assert got == pytest.approx(task.measured_loss(one, calib) - base, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("storage", ["factored", "materialized"])
@pytest.mark.parametrize("method", ["svd", "gfwsvd"])
def test_exact_curve_is_the_quadratic_at_every_rank(storage, method):
    """The curve from one pass equals the brute-force quadratic of W - W_r for every r (GPT-2 Conv1D)."""
    from gfwsvd_core.yardstick import exact_quadratic_curve
    from test_stats import lm_loss, make_batch

    model = tiny_models.tiny_gpt2()
    stats = collect_statistics(model, [make_batch(B=3, T=6, seed=s) for s in range(2)], lm_loss, storage=storage)
    decs = decompose_layers(model, stats, method)
    for name in list(decs)[:3]:
        W = get_weight(model.get_submodule(name)).detach()
        dec, s = decs[name], stats[name]
        curve = dec.exact_curve
        assert curve is not None and curve.shape == (dec.decomposition.max_rank + 1,)
        assert float(curve[0]) == pytest.approx(s.quadratic(W), rel=1e-5)  # rank 0: the whole weight removed
        for r in range(1, dec.decomposition.max_rank + 1):
            dW = (W.double() - dec.decomposition.reconstruct(r)).float()
            assert float(curve[r]) == pytest.approx(s.quadratic(dW), rel=1e-4, abs=1e-6 * float(curve[0])), (name, r)  # float32 products
        assert float(curve[-1]) <= 1e-6 * float(curve[0])  # full rank reproduces W
        # the chunked pass gives the same curve
        tiny = exact_quadratic_curve(s, dec.decomposition, W, budget_bytes=1)
        torch.testing.assert_close(tiny, curve, rtol=1e-6, atol=1e-12)


def test_allocation_uses_the_exact_yardstick_when_samples_exist():
    from gfwsvd_core.compress import EXACT_YARDSTICK, OWN_YARDSTICK, allocation_curves
    from gfwsvd_core.ranks import budget_ranks
    from test_stats import lm_loss, make_batch

    model = tiny_models.tiny_gpt2()
    batches = [make_batch(B=3, T=6, seed=s) for s in range(2)]
    with_samples = decompose_layers(model, collect_statistics(model, batches, lm_loss), "kfac")
    curves, yard = allocation_curves(with_samples)
    assert yard == EXACT_YARDSTICK
    assert all(torch.equal(curves[n], d.exact_curve) for n, d in with_samples.items())
    shapes = {n: d.shape for n, d in with_samples.items()}
    ranks = budget_ranks(curves, shapes, 0.4)
    # the allocation's summed exact quadratic is no worse than uniform ranks at the same budget
    from gfwsvd_core.ranks import kept_params, uniform_ranks

    uni = uniform_ranks(shapes, 0.4)
    total = lambda rk: sum(0.0 if rk[n] is None else float(curves[n][rk[n]]) for n in shapes)  # noqa: E731
    assert kept_params(shapes, ranks)[0] <= 0.4 * kept_params(shapes, ranks)[1] + 1e-9
    assert total(ranks) <= total(uni) * (1 + 1e-9)
    without = decompose_layers(model, collect_statistics(model, batches, lm_loss, kinds=["kfac"]), "kfac")
    curves, yard = allocation_curves(without)
    assert yard == OWN_YARDSTICK and all(d.exact_curve is None for d in without.values())
    assert all(torch.equal(curves[n], d.predicted_loss) for n, d in without.items())


def test_sweep_rows_carry_intervals_and_a_paired_verdict_per_ratio():
    model, task, calib, evaluation, stats = setup("retrieval")
    rows = ev.sweep(model, stats, task, evaluation, ["svd", "kfac"], [0.3])
    dense, cells = rows[0], rows[1:]
    assert "intervals" in dense and "comparison" not in dense
    assert [r["method"] for r in cells] == ["svd", "kfac"]
    for r in cells:
        for k, v in r["metrics"].items():
            lo, hi = r["intervals"]["metrics"][k]
            assert lo <= v + 1e-12 and v <= hi + 1e-12
        assert r["comparison"] is cells[0]["comparison"]  # one verdict per ratio, on each of its rows
    for metric, v in cells[0]["comparison"].items():
        pick = (max if task.higher_is_better.get(metric) else min)(cells, key=lambda r: r["metrics"][metric])
        assert v["best"] == pick["method"]
        assert v["all_resolved"] == (v["unresolved"] == [])
