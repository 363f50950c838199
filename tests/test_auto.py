"""Auto: folds that merge to the one-pass statistics, held-out scores against brute force, the
choice never worse than a candidate on its fold, budget ranks, export and reload."""

import pytest
import torch

import tiny_models
from gfwsvd_core import pipeline
from gfwsvd_core.compress import HELDOUT_YARDSTICK, allocation_curves, decompose_layers
from gfwsvd_core.errors import ConfigurationError
from gfwsvd_core.io import load_compressed, save_compressed
from gfwsvd_core.layers import get_weight
from gfwsvd_core.methods import get_method
from gfwsvd_core.ranks import kept_params


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    folder = tiny_models.save_tiny(tiny_models.tiny_bert(num_labels=3), tmp_path_factory.mktemp("m") / "bert")
    import csv

    from gfwsvd_core.data import default_passages

    path = tmp_path_factory.mktemp("d") / "labelled.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i, t in enumerate(default_passages()[:40]):
            w.writerow([t, i % 3])
    e = pipeline.prepare(model=str(folder), calib=str(path), samples=24, eval_samples=12, max_length=24,
                         batch_size=4, device="cpu")
    pipeline.collect(e, ["auto"])
    return e


def test_folds_merge_to_the_one_pass_statistics(exp):
    a, b = exp.fold_stats
    one = pipeline.Experiment(**{k: getattr(exp, k) for k in ("bundle", "task", "calib", "evaluation", "calib_batches",
                                                              "eval_batches", "settings", "layers")})
    pipeline.collect(one, ["auto"], folds=False)
    assert one.fold_stats is None
    for name in exp.layers:
        s, ref = exp.stats[name], one.stats[name]
        assert a[name].num_samples + b[name].num_samples == s.num_samples == ref.num_samples == 24
        assert a[name].num_samples == 12  # even batches: 0, 2, 4 of 6 batches of 4
        for field in ("xx_sum", "dd_sum", "grad_sq_sum", "grad_sum"):
            torch.testing.assert_close(getattr(s, field), getattr(ref, field), rtol=1e-5, atol=1e-9)
        # the folds' samples are views into the merged ones: no second copy is kept
        src = s.X if s.X is not None else s.G
        fold_src = b[name].X if b[name].X is not None else b[name].G
        assert fold_src.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()


def _brute_heldout(fold_b, dec, W, rank):
    """mean over fold-B samples of <G_k, W - W_r>^2 / 2 with every G_k formed densely."""
    G = torch.stack(list(fold_b.per_sample_gradients())) if fold_b.G is None else fold_b.G
    dW = W.double() - (dec.reconstruct(rank) if rank else torch.zeros_like(W, dtype=torch.float64))
    return float(0.5 * ((G.double() * dW).sum((1, 2)) ** 2).mean())


def test_heldout_scores_and_choice(exp):
    decs = pipeline.decompositions(exp, "auto")
    name = exp.layers[0]
    W = get_weight(exp.model.get_submodule(name))
    d = decs[name]
    cands = d.info["candidates"]
    assert cands == ["svd", "fwsvd", "kfac", "gfwsvd", "asvd", "svdllm"]  # every method with statistics
    assert set(d.heldout_curves) == set(cands)
    fold_kfac = decompose_layers(exp.model, exp.fold_stats[0], "kfac", layers=[name])[name]
    for r in (0, 3, 10):
        assert d.heldout_curves["kfac"][r] == pytest.approx(_brute_heldout(exp.fold_stats[1][name], fold_kfac.decomposition, W, r),
                                                            rel=1e-6, abs=1e-12)
    for name, d in decs.items():
        H = torch.stack([d.heldout_curves[c] for c in cands])
        # never worse than any single candidate on the held-out fold, at every rank
        assert (d.allocation_curve <= H.min(0).values + 1e-15).all()
        assert (d.allocation_curve[None] <= H + 1e-15).all()
        for r in (1, 5, d.decomposition.max_rank):
            chosen = d.method_at(r)
            assert float(d.heldout_curves[chosen][r]) == float(H[:, r].min())
            # its factors are the chosen candidate's, fitted on all samples
            up, down = d.decomposition.factors(r)
            ref_up, ref_down = exp.decompositions[chosen][name].decomposition.factors(r)
            assert torch.equal(up, ref_up) and torch.equal(down, ref_down)
            assert float(d.exact_curve[r]) == float(exp.decompositions[chosen][name].exact_curve[r])
    assert allocation_curves(decs)[1] == HELDOUT_YARDSTICK


def test_budget_ranks_report_export_and_reload(exp, tmp_path):
    comp, rep = pipeline.run_compression(exp, "auto", ratio=0.5)
    shapes = {n: d.shape for n, d in comp.decompositions.items()}
    after, before = kept_params(shapes, comp.ranks)
    assert after <= 0.5 * before + 1e-9
    assert len({r for r in comp.ranks.values()}) > 1 or len(comp.ranks) == 1  # a budget, not one uniform rank
    for rec in rep["layers"]:
        assert rec["chosen_method"] in rec["candidates"] or rec["rank"] is None
        assert rec["choice"][0][0] == 0 and rec["choice"][-1][1] == min(rec["shape"])
    assert rep["method"] == "auto"
    out = save_compressed(comp.model, tmp_path / "auto", tokenizer=exp.bundle.tokenizer, method="auto",
                          source_model="tiny", calibration=exp.data_record())
    loaded = load_compressed(out)
    with torch.no_grad():
        for b in exp.eval_batches:
            x = {k: b[k] for k in ("input_ids", "attention_mask")}
            assert torch.equal(loaded(**x).logits, comp.model(**x).logits)


def test_auto_errors(exp):
    with pytest.raises(ConfigurationError, match="collect statistics again"):
        plain = pipeline.Experiment(**{k: getattr(exp, k) for k in ("bundle", "task", "calib", "evaluation",
                                                                    "calib_batches", "eval_batches", "settings", "layers")})
        pipeline.collect(plain, ["svd", "kfac", "fwsvd", "gfwsvd", "asvd", "svdllm"])
        pipeline.decompositions(plain, "auto")
    with pytest.raises(ConfigurationError, match="use pipeline.decompositions"):
        decompose_layers(exp.model, exp.stats, "auto")
    with pytest.raises(ConfigurationError, match="unknown method"):
        get_method("auto", candidates=("svd", "nope"))
    with pytest.raises(ConfigurationError, match="composite"):
        get_method("auto", candidates=("svd", "auto"))
    assert get_method("auto", candidates="kfac, svd").candidates == ("kfac", "svd")
    few = pipeline.Experiment(**{k: getattr(exp, k) for k in ("bundle", "task", "calib", "evaluation",
                                                              "calib_batches", "eval_batches", "settings", "layers")})
    pipeline.collect(few, ["svd", "kfac"], folds=True)
    decs = pipeline.decompositions(few, "auto")  # chooses among the methods whose statistics are there
    from gfwsvd_core.methods import available_methods, method_class
    from gfwsvd_core.stats import has_kinds

    expected = [n for n in available_methods() if n != "auto" and method_class(n).auto_candidate
                and not has_kinds(few.stats, method_class(n).requires)]
    assert "svdllm2" not in expected  # SVD-LLM's truncation again: only its ranks differ
    assert next(iter(decs.values())).info["candidates"] == expected
    assert "kfac" in expected and "fwsvd" not in expected  # the diagonal Fisher was not collected
    with pytest.raises(ConfigurationError, match="lack statistics"):
        pipeline.decompositions(few, get_method("auto", candidates=("svd", "fwsvd")))
