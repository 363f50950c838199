"""Rank allocation: uniform ratios, break-even, explicit maps and the global budget (vs brute force)."""

import itertools
import math

import pytest
import torch

from gfwsvd_core.ranks import (
    budget_ranks, check_ratio, kept_params, layer_params, rank_for_ratio, uniform_ranks, validate_ranks,
)

SHAPES = {"sq": (32, 32), "tall": (128, 32), "wide": (32, 128), "odd": (24, 40)}


# --------------------------------------------------------------------------- uniform ratios


def test_ratio_one_keeps_every_layer_dense():
    # 128 x 32: floor(4096 / 160) = 25 ranks would keep 4000 < 4096 parameters, but ratio 1 means
    # "keep everything", so the layer must stay dense
    assert uniform_ranks(SHAPES, 1.0) == {n: None for n in SHAPES}
    assert rank_for_ratio(128, 32, 1) is None


@pytest.mark.parametrize("m,n", [(32, 32), (128, 32), (24, 40), (7, 5), (2, 2), (1, 9)])
def test_break_even_stays_dense(m, n):
    # the largest ratio whose rank still shrinks the layer gives a rank; at break-even it is dense
    be = m * n / (m + n)
    for ratio in (0.999, 0.99, 0.9):
        r = rank_for_ratio(m, n, ratio)
        assert r is None or r * (m + n) < m * n
    if be == int(be):  # square-like layers: the break-even rank itself would keep everything
        assert rank_for_ratio(m, n, 1.0) is None
    assert rank_for_ratio(1, 9, 0.5) is None  # r(m+n) >= mn already at rank 1
    assert rank_for_ratio(2, 2, 0.5) is None


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
def test_rank_for_ratio_keeps_about_ratio(ratio):
    for m, n in SHAPES.values():
        r = rank_for_ratio(m, n, ratio)
        assert r is not None and 1 <= r <= min(m, n)
        kept = r * (m + n) / (m * n)
        assert kept <= ratio + 1e-12  # never more than asked
        assert kept > ratio - (m + n) / (m * n) - 1e-12  # within one rank of it


def test_rank_for_ratio_align_and_floor():
    assert rank_for_ratio(512, 512, 0.01) == 2  # floor(0.01 * 256) = 2
    assert rank_for_ratio(512, 512, 0.001) == 1  # at least rank 1
    assert rank_for_ratio(512, 512, 0.5, align=8) % 8 == 0
    assert rank_for_ratio(512, 512, 0.01, align=8) == 8  # rounded up to one aligned block


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, 1.5, 1.0000001, float("nan"), float("inf"), "abc", None])
def test_ratio_outside_range_is_an_error(bad):
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(32, 32, bad)
    with pytest.raises(ValueError, match="ratio"):
        uniform_ranks(SHAPES, bad)
    with pytest.raises(ValueError, match="ratio"):
        check_ratio(bad)


# --------------------------------------------------------------------------- parameter counts


def test_kept_params():
    ranks = {"sq": 4, "tall": None, "wide": 10, "odd": 1}
    after, before = kept_params(SHAPES, ranks)
    assert before == 32 * 32 + 128 * 32 + 32 * 128 + 24 * 40
    assert after == 4 * 64 + 128 * 32 + 10 * 160 + 1 * 64
    # layers without an entry count as dense
    assert kept_params(SHAPES, {}) == (before, before)
    assert layer_params(128, 32, None) == 4096 and layer_params(128, 32, 3) == 480


# --------------------------------------------------------------------------- explicit ranks


def test_validate_ranks_accepts_and_normalises():
    out = validate_ranks(SHAPES, {"sq": 4, "tall": None, "wide": 32, "odd": 15})
    assert out["sq"] == 4 and out["tall"] is None
    assert out["wide"] is None  # 32 * 160 >= 4096: break-even, stays dense
    assert out["odd"] is None  # 15 * 64 = 960 = 24 * 40
    assert validate_ranks(SHAPES, {"odd": 14}) == {"odd": 14}


def test_validate_ranks_unknown_layer_lists_existing():
    with pytest.raises(ValueError) as e:
        validate_ranks(SHAPES, {"encoder.nope": 3})
    msg = str(e.value)
    assert "encoder.nope" in msg
    for name in SHAPES:
        assert name in msg


@pytest.mark.parametrize("bad", [0, -1, 33, 2.5, 4.0, "4", True, [4]])
def test_validate_ranks_bad_rank(bad):
    with pytest.raises(ValueError, match="sq"):
        validate_ranks(SHAPES, {"sq": bad})


# --------------------------------------------------------------------------- global budget


def tail_curve(svals) -> torch.Tensor:
    """curve[k] = 1/2 sum_{i>k} s_i^2 (k = 0 .. len), as the solver reports it."""
    sq = torch.tensor(svals, dtype=torch.float64) ** 2
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
    return 0.5 * torch.cat([tail, tail.new_zeros(1)])


def options(curve, m, n):
    opts = [(r * (m + n), float(curve[r]), r) for r in range(1, min(m, n) + 1) if r * (m + n) < m * n]
    return opts + [(m * n, 0.0, None)]


def brute_force(curves, shapes, ratio):
    """Exact optimum over every combination of per-layer choices (rank below break-even or dense)."""
    budget = ratio * sum(m * n for m, n in shapes.values())
    names = list(shapes)
    best = (math.inf, None)
    for combo in itertools.product(*(options(curves[n], *shapes[n]) for n in names)):
        cost = sum(c for c, _, _ in combo)
        if cost <= budget:
            loss = sum(l for _, l, _ in combo)
            if loss < best[0] - 1e-15:
                best = (loss, {n: r for n, (_, _, r) in zip(names, combo)})
    return best


def total_loss(curves, ranks):
    return sum(0.0 if r is None else float(curves[n][r]) for n, r in ranks.items())


def used(shapes, ranks):
    return kept_params(shapes, ranks)[0]


def test_budget_respects_budget_and_rank_one_floor():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (16, 24), "b": (24, 16), "c": (20, 20), "d": (8, 40)}
    curves = {n: tail_curve(sorted(torch.rand(min(s), generator=g).tolist(), reverse=True)) for n, s in shapes.items()}
    total = sum(m * n for m, n in shapes.values())
    for ratio in [0.3, 0.35, 0.5, 0.62, 0.8, 0.95, 1.0]:
        ranks = budget_ranks(curves, shapes, ratio)
        assert set(ranks) == set(shapes)
        assert used(shapes, ranks) <= ratio * total + 1e-9
        for n, r in ranks.items():
            m, k = shapes[n]
            assert r is None or (1 <= r and r * (m + k) < m * k)
    with pytest.raises(ValueError, match="too small"):
        budget_ranks(curves, shapes, 0.05)
    with pytest.raises(ValueError, match="ratio"):
        budget_ranks(curves, shapes, 1.5)


def test_budget_more_parameters_never_lose_more():
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (16, 24), "b": (24, 16), "c": (20, 20)}
    curves = {n: tail_curve(sorted(torch.rand(min(s), generator=g).tolist(), reverse=True)) for n, s in shapes.items()}
    losses = [total_loss(curves, budget_ranks(curves, shapes, r)) for r in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))


def test_budget_optimal_vs_brute_force_convex_equal_costs():
    # three 8 x 8 layers (step cost 16, dense = 4 steps) with geometric spectra: every layer's
    # (parameters, loss) choices, dense included, are convex, so greedy is exactly optimal
    shapes = {"a": (8, 8), "b": (8, 8), "c": (8, 8)}
    curves = {n: tail_curve([scale * 0.6 ** i for i in range(8)]) for n, scale in zip(shapes, (1.0, 0.7, 1.6))}
    total = sum(m * n for m, n in shapes.values())
    for used_params in range(48, total + 1, 4):
        ratio = used_params / total
        ranks = budget_ranks(curves, shapes, ratio)
        best, _ = brute_force(curves, shapes, ratio)
        assert total_loss(curves, ranks) == pytest.approx(best, rel=1e-12, abs=1e-15), ratio


def test_budget_near_optimal_vs_brute_force_mixed_shapes():
    # different step costs: greedy is within one step of the optimum (never worse than the
    # optimum with the budget reduced by the largest step) and usually equal to it
    g = torch.Generator().manual_seed(2)
    shapes = {"a": (6, 10), "b": (12, 4), "c": (7, 7)}
    curves = {n: tail_curve([float(torch.rand(1, generator=g)) * 0.5 ** i for i in range(min(s))])
              for n, s in shapes.items()}
    total = sum(m * n for m, n in shapes.values())
    step = max(m + n for m, n in shapes.values())
    equal = 0
    ratios = [c / total for c in range(48, total + 1, 3)]
    for ratio in ratios:
        ranks = budget_ranks(curves, shapes, ratio)
        loss = total_loss(curves, ranks)
        best, _ = brute_force(curves, shapes, ratio)
        assert loss >= best - 1e-12
        if ratio * total - step >= 46:  # rank 1 everywhere
            worse, _ = brute_force(curves, shapes, (ratio * total - step) / total)
            assert loss <= worse + 1e-12
        equal += loss <= best + 1e-12
    assert equal >= 0.8 * len(ratios)


def test_budget_layers_go_dense_at_break_even():
    shapes = {"sq": (8, 8), "tall": (24, 8), "odd": (6, 10)}
    curves = {n: tail_curve([0.9 ** i for i in range(min(s))]) for n, s in shapes.items()}
    assert budget_ranks(curves, shapes, 1.0) == {n: None for n in shapes}
    # a layer whose last rank below break-even (24x8: r=5, 160 of 192) needs only 32 more
    # parameters (less than one rank step of 32) to become dense and lose nothing
    total = sum(m * n for m, n in shapes.values())
    ranks = budget_ranks(curves, shapes, (total - 1) / total)
    assert sum(r is None for r in ranks.values()) >= 2
    # a huge loss on one layer: it goes dense first, at cost mn, and the others stay factorised
    curves["tall"] = 1e6 * curves["tall"]
    ranks = budget_ranks(curves, shapes, 0.75)  # 237 parameters: dense tall (192) + rank 1 of the others
    assert ranks["tall"] is None
    assert ranks["sq"] is not None and ranks["odd"] is not None


def test_budget_missing_curve():
    with pytest.raises(ValueError, match="curve"):
        budget_ranks({"a": tail_curve([1.0, 0.5])}, {"a": (2, 4), "b": (4, 4)}, 0.9)
