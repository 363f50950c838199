"""Intervals and paired comparisons of the common yardstick."""

import pytest
import torch

from gfwsvd_core.yardstick import best_of, bootstrap_interval


def test_bootstrap_interval_covers_the_mean_at_about_the_stated_rate():
    g = torch.Generator().manual_seed(1)
    hits, trials = 0, 300
    for t in range(trials):
        v = torch.randn(60, generator=g, dtype=torch.float64) * 2 + 5
        mean, lo, hi = bootstrap_interval(v, 0.95, resamples=800, seed=t)
        assert lo <= mean <= hi
        hits += lo <= 5 <= hi
    assert 0.90 <= hits / trials <= 0.985  # percentile bootstrap runs slightly narrow at K = 60


def test_bootstrap_of_one_value_is_unbounded():
    mean, lo, hi = bootstrap_interval(torch.tensor([3.0]))
    assert mean == 3.0 and lo == float("-inf") and hi == float("inf")


def test_best_of_is_paired_and_says_when_it_is_resolved():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(16, generator=g, dtype=torch.float64) * 10  # large spread shared by all options
    clear = {"a": base, "b": base + 0.5, "c": base + 0.01 * torch.rand(16, generator=g, dtype=torch.float64)}
    out = best_of(clear)
    assert out["best"] == "a"
    # paired: b is always 0.5 worse, resolved although the unpaired intervals overlap
    _, lo_a, hi_a = bootstrap_interval(base)
    _, lo_b, _ = bootstrap_interval(base + 0.5)
    assert lo_b < hi_a and out["resolved"]["b"]
    noisy = {"a": base, "b": base + 0.3 * torch.randn(16, generator=g, dtype=torch.float64)}
    out = best_of(noisy)
    assert out["resolved"] == {("b" if out["best"] == "a" else "a"): False} and not out["all_resolved"]


def test_kronecker_verdicts_and_their_causes():
    from gfwsvd_core.explore import judge_kronecker, sample_note

    good = judge_kronecker({"eta": 0.8, "gap": 0.3, "converged": True}, 512, (64, 32), "sequence")
    assert good == {"verdict": "good", "reasons": []}
    fair = judge_kronecker({"eta": 0.3, "gap": 0.5}, 512, (64, 32), "sequence")
    assert fair["verdict"] == "fair" and len(fair["reasons"]) == 1 and "eta 0.30" in fair["reasons"][0]
    poor = judge_kronecker({"eta": 0.07, "gap": 0.57}, 16, (1536, 384), "batch")
    assert poor["verdict"] == "poor"
    assert poor["reasons"][-1] == sample_note(16, (1536, 384), "batch") and "K = 16" in poor["reasons"][-1]
    assert judge_kronecker({"eta": 0.9, "gap": 0.95}, 512, (64, 32), "token")["verdict"] == "poor"
    assert judge_kronecker({"eta": 0.9, "gap": 0.1, "converged": False}, 512, (64, 32), "token")["verdict"] == "poor"
    assert sample_note(512, (64, 32), "token") is None


def test_metric_intervals_resample_examples_and_pair_the_change():
    from gfwsvd_core.tasks import get_task
    from gfwsvd_core.yardstick import metric_intervals

    task = get_task("causal-lm")  # a ratio metric: aggregate, not a mean of per-example values
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(5, 20, (200,), generator=g).double()
    base = {"nll_sum": counts * (2 + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)), "targets": counts}
    worse = {"nll_sum": base["nll_sum"] + counts * 0.05, "targets": counts}  # every text 0.05 nats worse
    same = {"nll_sum": base["nll_sum"] + counts * 0.001 * torch.randn(200, generator=g, dtype=torch.float64),
            "targets": counts}
    iv = metric_intervals(task, worse, base, resamples=400)
    point = task.aggregate(worse)["loss"]
    lo, hi = iv["metrics"]["loss"]
    assert lo < point < hi and iv["examples"] == 200
    clo, chi = iv["change"]["loss"]
    assert clo == pytest.approx(0.05, rel=1e-6) and chi == pytest.approx(0.05, rel=1e-6)  # paired: no spread
    assert iv["resolved"] == {"loss": True, "perplexity": True}
    iv = metric_intervals(task, same, base, resamples=400)
    assert iv["change"]["loss"][0] < 0 < iv["change"]["loss"][1] and not iv["resolved"]["loss"]
    assert "change" not in metric_intervals(task, base, resamples=50)
