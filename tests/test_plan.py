"""The memory plan: its byte counts against what collection keeps, its groups against the budget,
its errors, the ``gfwsvd plan`` CLI, and a small-budget run whose measured peak stays under it."""

import gc
import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import tiny_models
from gfwsvd_core.cli import main
from gfwsvd_core.errors import ConfigurationError
from gfwsvd_core.meter import measure
from gfwsvd_core.pipeline import required_kinds
from gfwsvd_core.plan import make_plan, parse_bytes
from gfwsvd_core.stats import collect_statistics, plan_groups
from gfwsvd_core.tasks import get_task

MiB = 2**20


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


def _batches(num, length, batch, vocab=tiny_models.VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num, length), generator=g)
    return [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch]),
             "labels": ids[i:i + batch].clone()} for i in range(0, num, batch)]


def _loss(model, batch):
    return get_task("causal-lm-packed").fisher_loss(model, batch)


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("500MB") == 500 * 10**6 and parse_bytes(1024) == 1024
    assert parse_bytes(None) is None
    with pytest.raises(ConfigurationError, match="not understood"):
        parse_bytes("lots")


@pytest.mark.parametrize("unit,methods", [("sequence", ["gfwsvd"]), ("token", ["gfwsvd"]), ("batch", ["fwsvd"]),
                                          ("sequence", ["svdllm", "kfac"])])
def test_plan_counts_the_bytes_collection_keeps(unit, methods):
    model = tiny_models.tiny_llama(hidden=48)
    num, length, batch = 6, 12, 3
    plan = make_plan(model, num, length, "cpu", None, methods, unit, batch_size=batch)
    stats = collect_statistics(model, _batches(num, length, batch), _loss, layers=[lp.name for lp in plan.layers],
                               kinds=required_kinds(methods), sample_unit=unit)
    for lp in plan.layers:
        assert lp.stats_bytes == stats[lp.name].nbytes(), lp.name
        want = stats[lp.name].storage or "streamed"
        assert lp.storage == want, lp.name


@pytest.fixture(scope="module")
def mid_model():
    """Wide enough that statistics, not the logits of one batch, dominate (batch size 1)."""
    return tiny_models.tiny_llama(hidden=256, layers=2)


def _multi_pass_budget(model, num, length, batch, slack):
    """``(unbounded plan, budget)``: room for the statistics' transient between the largest layer
    and all layers (several passes), and enough for the other stages. K-FAC plus the per-sample
    gradients of the exact yardstick: the statistics dominate."""
    free = make_plan(model, num, length, "cpu", None, ["kfac"], batch_size=batch, extra_kinds=("samples",))
    kept = sum(lp.stats_bytes for lp in free.layers)
    largest = max(lp.stats_bytes for lp in free.layers)
    others = max(s.host_peak for s in free.stages if s.name != "statistics")
    return free, free.model_bytes + max(others, kept + max(largest, free.activation_bytes)) + slack


def test_groups_respect_the_budget_and_collection_follows_them(mid_model):
    model = mid_model
    num, length, batch = 32, 64, 1
    free, budget = _multi_pass_budget(model, num, length, batch, 1)
    kept = sum(lp.stats_bytes for lp in free.layers)
    assert budget < free.model_bytes + 2 * kept  # one pass would not fit
    plan = make_plan(model, num, length, "cpu", budget, ["kfac"], batch_size=batch, extra_kinds=("samples",))
    assert len(plan.groups) > 1 and plan.fits
    sizes = {lp.name: lp.stats_bytes for lp in plan.layers}
    assert all(sum(sizes[n] for n in g) <= plan.collect_max_memory for g in plan.groups)
    assert plan_groups(sizes, plan.collect_max_memory) == plan.groups
    assert plan.peak_host <= budget
    totals = []
    collect_statistics(model, _batches(num, length, batch), _loss, layers=list(sizes), kinds=plan.kinds,
                       max_memory=plan.collect_max_memory, progress=lambda d, t, m: totals.append(t))
    assert totals[-1] == len(plan.groups) * (num // batch)  # one pass over the batches per group
    # a larger budget: one pass, and the decompositions' caches kept
    roomy = make_plan(model, num, length, "cpu", 100 * budget, ["gfwsvd"], batch_size=batch)
    assert len(roomy.groups) == 1 and not roomy.lean


def test_too_small_budget_says_the_smallest_that_works():
    model = tiny_models.tiny_llama(hidden=48)
    plan = make_plan(model, 6, 12, "cpu", "1MB", ["gfwsvd"], batch_size=3)
    assert not plan.fits and plan.minimum_bytes > 10**6
    with pytest.raises(ConfigurationError, match="smallest budget that works is about"):
        plan.check()
    ok = make_plan(model, 6, 12, "cpu", plan.minimum_bytes, ["gfwsvd"], batch_size=3)
    assert ok.fits and ok.check() is ok
    assert ok.peak_host <= plan.minimum_bytes
    text = ok.table()
    assert "statistics" in text and "factors" in text and "model.layers.0.mlp.up_proj" in text


def test_plan_from_meta_config_needs_no_weights():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000, architectures=["LlamaForCausalLM"])
    plan = make_plan(cfg, 128, 512, "cuda", "80GB", ["gfwsvd"], batch_size=8)
    assert len(plan.layers) == 32 * 7 and plan.model_bytes == pytest.approx(6.74e9 * 4, rel=0.01)
    json.dumps(plan.as_dict())


def test_cli_plan_on_a_tiny_folder(tmp_path):
    folder = tiny_models.save_tiny(tiny_models.tiny_llama(), tmp_path / "llama")
    report = tmp_path / "plan.json"
    o, e = io.StringIO(), io.StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        code = main(["plan", "--model", str(folder), "--samples", "8", "--max-length", "32", "--max-memory", "4GiB",
                     "--methods", "gfwsvd,svd", "--report", str(report)])
    assert code == 0, e.getvalue()
    assert "factors" in o.getvalue() and "storage:" in o.getvalue()
    rep = json.loads(report.read_text())
    assert rep["fits"] and rep["max_memory"] == 4 * 2**30 and len(rep["layers"]) == 14
    o, e = io.StringIO(), io.StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        code = main(["plan", "--model", str(folder), "--samples", "8", "--max-length", "32", "--max-memory", "100kB"])
    assert code == 2 and "smallest budget that works" in e.getvalue()


def test_cli_evaluate_with_max_memory(tmp_path):
    """--max-memory end to end: at the smallest budget the plan allows, the run completes; below it,
    the CLI stops before any work and names the smallest budget."""
    from gfwsvd_core import pipeline
    from gfwsvd_core.plan import plan_experiment

    folder = tiny_models.save_tiny(tiny_models.tiny_gpt2(), tmp_path / "gpt2")
    small = ["--samples", "6", "--eval-samples", "4", "--max-length", "24", "--batch-size", "3", "--device", "cpu"]
    exp = pipeline.prepare(model=str(folder), samples=6, eval_samples=4, max_length=24, batch_size=3, device="cpu")
    least = plan_experiment(exp, None, ["gfwsvd"], ("samples",)).minimum_bytes
    tight = plan_experiment(exp, least, ["gfwsvd"], ("samples",))
    assert tight.fits and tight.peak_host <= least and exp.lean == tight.lean
    o, e = io.StringIO(), io.StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        code = main(["evaluate", "--model", str(folder), *small, "--method", "gfwsvd", "--ratio", "0.5", "--quiet",
                     "--max-memory", str(least), "--report", str(tmp_path / "r.json")])
    assert code == 0, e.getvalue()
    assert json.loads((tmp_path / "r.json").read_text())["layers"]
    with redirect_stdout(o), redirect_stderr(e):
        code = main(["evaluate", "--model", str(folder), *small, "--method", "gfwsvd", "--quiet", "--max-memory", "1MB"])
    assert code == 2 and "smallest budget" in e.getvalue()


def test_lean_decompositions_keep_truncation():
    from gfwsvd_core.compress import compress, decompose_layers

    model = tiny_models.tiny_llama(hidden=32)
    stats = collect_statistics(model, _batches(6, 12, 3), _loss, kinds=("samples", "kfac"))
    full = decompose_layers(model, stats, "gfwsvd")
    lean = decompose_layers(model, stats, "gfwsvd", lean=True)
    for n in full:
        assert lean[n].weights is None and full[n].weights is not None
        torch.testing.assert_close(lean[n].decomposition.reconstruct(4), full[n].decomposition.reconstruct(4))
    comp = compress(model, stats, "gfwsvd", ratio=0.5, decompositions=lean)
    assert comp.ranks


def test_small_budget_run_stays_under_it(mid_model):
    """A budget that forces several passes: the collection's measured peak growth stays under the
    budget's share for statistics (generously: x1.5 plus 64 MiB of allocator and interpreter noise)."""
    model = mid_model
    num, length, batch = 32, 64, 1
    free, budget = _multi_pass_budget(model, num, length, batch, MiB)
    kept = sum(lp.stats_bytes for lp in free.layers)
    plan = make_plan(model, num, length, "cpu", budget, ["kfac"], batch_size=batch, extra_kinds=("samples",))
    assert plan.fits and len(plan.groups) > 1
    batches = _batches(num, length, batch)
    gc.collect()
    with measure("cpu") as rec:
        stats = collect_statistics(model, batches, _loss, layers=[lp.name for lp in plan.layers], kinds=plan.kinds,
                                   max_memory=plan.collect_max_memory)
    assert rec.cpu_peak_extra_mb is not None
    measured = rec.cpu_peak_extra_mb * MiB
    assert measured <= 1.5 * (budget - plan.model_bytes) + 64 * MiB, (measured / MiB, budget / MiB)
    assert sum(s.nbytes() for s in stats.values()) == kept


def _stream_budget(exp, methods, extra=()):
    """A budget between the streamed minimum and what keeping every layer's statistics needs."""
    from gfwsvd_core.plan import plan_experiment

    free = plan_experiment(exp, None, methods, extra)
    lean = sum(lp.dec_kept for lp in free.layers)
    keep = plan_experiment(exp, 10**12, methods, extra)
    need = {lp.name: lp.factor_kept + max(lp.factor_peak, lp.svd_peak) for lp in free.layers}
    stream_min = free.model_bytes + lean + max(lp.stats_bytes + max(lp.samples_bytes, free.activation_bytes,
                                                                    need[lp.name]) for lp in free.layers)
    assert not keep.stream and free.minimum_bytes == stream_min < free.minimum_keep_bytes, \
        (stream_min, free.minimum_keep_bytes)
    return free, stream_min


def test_streamed_run_equals_the_kept_one(tmp_path):
    """Statistics consumed group by group give the same decompositions (truncations, exact curves)
    and report as one pass that keeps them all; the plan streams only when keeping would not fit,
    and then keeps no statistics tensor."""
    from gfwsvd_core import pipeline
    from gfwsvd_core.plan import plan_experiment

    folder = tiny_models.save_tiny(tiny_models.tiny_llama(hidden=128), tmp_path / "llama")
    opts = dict(model=str(folder), samples=16, eval_samples=4, max_length=32, batch_size=2, device="cpu")
    methods = ["gfwsvd", "svd[update=true]"]
    exp = pipeline.prepare(**opts)
    free, least = _stream_budget(exp, methods, ("samples",))  # the streamed minimum is the smallest budget
    plan = plan_experiment(exp, least, methods, ("samples",))
    assert plan.stream and plan.fits and plan.lean and len(plan.groups) > 1 and plan.peak_host <= least
    assert [n for g in plan.groups for n in g] == [lp.name for lp in plan.layers]
    assert "streamed" in plan.table()
    calls = []
    pipeline.collect_streamed(exp, methods, plan.groups, extra_kinds=("samples",),
                              progress=lambda d, t, msg: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] and all(d <= t for d, t in calls)
    assert exp.streamed == plan.groups and list(exp.stats) == exp.layers
    assert all(s.nbytes() == 0 and not s.has("samples") and s.num_samples == 16 for s in exp.stats.values())

    ref = pipeline.prepare(**opts)
    pipeline.collect(ref, methods=methods, extra_kinds=("samples",))
    for m in methods:
        key = pipeline.method_key(m)
        got, want = pipeline.decompositions(exp, m), pipeline.decompositions(ref, m)
        assert list(got) == list(want)
        for n in want:
            assert got[n].weights is None  # lean
            r = min(got[n].shape) // 2
            torch.testing.assert_close(got[n].decomposition.reconstruct(r), want[n].decomposition.reconstruct(r),
                                       rtol=1e-4, atol=1e-6, msg=f"{key} {n}")
            torch.testing.assert_close(got[n].exact_curve, want[n].exact_curve, rtol=1e-4, atol=1e-10)
    comp, rep = pipeline.run_compression(exp, "gfwsvd", ratio=0.5)
    comp_ref, rep_ref = pipeline.run_compression(ref, "gfwsvd", ratio=0.5)
    assert comp.ranks == comp_ref.ranks
    for a, b in zip(rep["layers"], rep_ref["layers"]):
        assert a["exact_quadratic"] == pytest.approx(b["exact_quadratic"], rel=1e-4, abs=1e-12)
        assert "fisher_alignment" not in a and "fisher_alignment" in b  # it needs the statistics
    assert rep["stages"]["statistics"]["streamed_groups"] == len(plan.groups)
    # a method that was not streamed cannot be decomposed afterwards
    with pytest.raises(ConfigurationError, match="collect them again"):
        pipeline.decompositions(exp, "kfac")
    with pytest.raises(ConfigurationError, match="cannot stream"):
        pipeline.collect_streamed(exp, ["auto"], plan.groups)


def test_cli_streams_under_a_small_budget(tmp_path):
    """compress --max-memory below what keeping every layer's statistics needs: the CLI streams,
    the run completes and its export reloads; the kept run's export gives the same weights."""
    from gfwsvd_core import pipeline
    from gfwsvd_core.io import load_compressed

    folder = tiny_models.save_tiny(tiny_models.tiny_llama(hidden=128), tmp_path / "llama")
    small = ["--samples", "16", "--eval-samples", "4", "--max-length", "32", "--batch-size", "2", "--device", "cpu"]
    exp = pipeline.prepare(model=str(folder), samples=16, eval_samples=4, max_length=32, batch_size=2, device="cpu")
    _, least = _stream_budget(exp, ["gfwsvd"])
    outs = {}
    for tag, budget in (("streamed", least), ("kept", 10**12)):
        o, e = io.StringIO(), io.StringIO()
        with redirect_stdout(o), redirect_stderr(e):
            code = main(["compress", "--model", str(folder), *small, "--method", "gfwsvd", "--ratio", "0.5",
                         "--quiet", "--max-memory", str(budget), "--out", str(tmp_path / tag),
                         "--report", str(tmp_path / f"{tag}.json")])
        assert code == 0, e.getvalue()
        outs[tag] = load_compressed(tmp_path / tag).state_dict()
        rep = json.loads((tmp_path / f"{tag}.json").read_text())
        assert ("streamed_groups" in rep["stages"]["statistics"]) == (tag == "streamed")
    for k, v in outs["kept"].items():
        torch.testing.assert_close(outs["streamed"][k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_streamed_run_stays_under_its_budget(tmp_path, mid_model):
    """At the streamed minimum, the run's measured peak growth stays under the budget's share
    (x1.5 plus 64 MiB of allocator, library and interpreter noise, as above) and under what
    keeping every layer's statistics would need: streaming is what made it fit."""
    from gfwsvd_core import pipeline
    from gfwsvd_core.plan import plan_experiment

    folder = tiny_models.save_tiny(mid_model, tmp_path / "mid")
    exp = pipeline.prepare(model=str(folder), samples=32, eval_samples=2, max_length=64, batch_size=1, device="cpu")
    free, least = _stream_budget(exp, ["gfwsvd"])
    plan = plan_experiment(exp, least, ["gfwsvd"])
    assert plan.stream and len(plan.groups) > 1
    gc.collect()
    pipeline.collect_streamed(exp, ["gfwsvd"], plan.groups)
    measured = exp.stages["statistics"]["cpu_peak_extra_mb"] * MiB
    share = least - plan.model_bytes
    assert measured <= 1.5 * share + 64 * MiB, (measured / MiB, share / MiB)
    assert measured < free.minimum_keep_bytes - plan.model_bytes, (measured / MiB, free.minimum_keep_bytes / MiB)


def test_accelerator_plan_offloads_the_decompositions_when_they_do_not_fit_beside_a_group():
    """LLaMA-2-7B in bfloat16 on a GPU: streamed, the lean decompositions need more than the budget
    leaves beside one group, so the plan moves them to host memory (the device then holds the
    model, one group and one layer's solve), and says so; on the CPU the same budget cannot work."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000, architectures=["LlamaForCausalLM"])
    args = (cfg, 32, 256)
    kw = dict(methods=["gfwsvd"], dtype=torch.bfloat16, batch_size=8)
    free = make_plan(*args, "cuda", None, **kw)
    lean = sum(lp.dec_kept for lp in free.layers)
    stream_on_device = make_plan(*args, "cuda", free.minimum_keep_bytes - 1, **kw)
    assert stream_on_device.stream and not stream_on_device.offload  # the decompositions still fit there
    least = free.minimum_bytes
    plan = make_plan(*args, "cuda", least, **kw)
    assert plan.fits and plan.stream and plan.offload and plan.lean
    assert plan.peak_device <= least < lean + free.model_bytes  # the decompositions alone would not fit
    assert plan.peak_host >= lean  # they wait in host memory
    assert "offloaded to host" in plan.table() and any("host memory" in n for n in plan.notes)
    assert not make_plan(*args, "cpu", least, **kw).fits


def test_offloaded_decompositions_truncate_like_kept_ones(tmp_path):
    """``exp.offload`` (set by such a plan) drops the weights and moves every decomposition to host
    memory once solved; truncations, curves and the compressed model are unchanged."""
    from gfwsvd_core import pipeline
    from gfwsvd_core.compress import offload_decomposition

    folder = tiny_models.save_tiny(tiny_models.tiny_llama(hidden=64), tmp_path / "llama")
    opts = dict(model=str(folder), samples=8, eval_samples=4, max_length=32, batch_size=2, device="cpu")
    exp, ref = pipeline.prepare(**opts), pipeline.prepare(**opts)
    for e in (exp, ref):
        pipeline.collect(e, ["gfwsvd"])
    exp.offload = True
    got, want = pipeline.decompositions(exp, "gfwsvd"), pipeline.decompositions(ref, "gfwsvd")
    for n, d in got.items():
        assert d.weights is None and want[n].weights is not None
        assert d.decomposition._up.device.type == "cpu" and d.exact_curve.device.type == "cpu"
        r = min(d.shape) // 2
        assert torch.equal(d.decomposition.reconstruct(r), want[n].decomposition.reconstruct(r))
        assert torch.equal(d.exact_curve, want[n].exact_curve)
    comp, _ = pipeline.run_compression(exp, "gfwsvd", ratio=0.5)
    comp_ref, _ = pipeline.run_compression(ref, "gfwsvd", ratio=0.5)
    assert comp.ranks == comp_ref.ranks
    for (k, v), (k2, v2) in zip(comp.model.state_dict().items(), comp_ref.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # a decomposition that cannot move says so
    bad = type("D", (), {"decomposition": object(), "method": "auto"})()
    with pytest.raises(ValueError, match="cannot be offloaded"):
        offload_decomposition(bad)


def test_plan_counts_gfwsvds_batch_of_small_layers_where_it_runs():
    """GFWSVD's batched small layers (``batch=auto``: CUDA only) hold a batch's stacked samples and
    bases while it solves: the factors stage's device peak counts them on CUDA, not on the CPU
    (where auto does not batch), and not with batch=off."""
    from transformers import LlamaConfig

    from gfwsvd_core.plan import _batch_bytes

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=1000, architectures=["LlamaForCausalLM"])
    peak = {}
    for dev, spec in (("cuda", "gfwsvd"), ("cuda", "gfwsvd[batch=off]"), ("cpu", "gfwsvd"), ("cpu", "gfwsvd[batch=on]")):
        p = make_plan(cfg, 8, 64, dev, None, [spec], batch_size=4)
        st = p.stage("factors")
        peak[dev, spec] = st.device_peak if dev == "cuda" else st.host_peak
        extra = _batch_bytes(p.layers, [spec], dev, 8, 64)  # 8 sequence samples of 64 tokens
        if (dev, spec) in (("cuda", "gfwsvd"), ("cpu", "gfwsvd[batch=on]")):
            assert extra > 0
        else:
            assert extra == 0
    assert peak["cuda", "gfwsvd"] > peak["cuda", "gfwsvd[batch=off]"]
    assert peak["cpu", "gfwsvd[batch=on]"] > peak["cpu", "gfwsvd"]
