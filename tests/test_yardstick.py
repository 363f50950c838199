"""Intervals and paired comparisons of the common yardstick."""

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
