"""End to end through pipeline: saved tiny models of every task, save/load, dense export, the default."""

import csv
import json
import math

import pytest
import torch
import transformers

import tiny_models
from gfwsvd_core import pipeline
from gfwsvd_core.data import default_passages
from gfwsvd_core.factorized import LowRankLinear
from gfwsvd_core.io import export_dense, load_compressed, save_compressed

REPORT_KEYS = ("method", "kept_ratio", "baseline_metrics", "metrics", "layers", "calibration", "timings")
LAYER_KEYS = ("layer", "rank", "params_before", "params_after", "predicted_loss", "exact_quadratic")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


def write_labelled_csv(path, n=40, classes=3):
    texts = default_passages()[:n]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i, t in enumerate(texts):
            w.writerow([t, i % classes])
    return path


def model_outputs(model, task, batches):
    """The raw outputs each task is built on, concatenated over batches."""
    outs = []
    with torch.no_grad():
        for b in batches:
            inputs = {k: b[k] for k in ("input_ids", "attention_mask") if k in b}
            if "token_type_ids" in b and task == "retrieval":
                inputs["token_type_ids"] = b["token_type_ids"]
            out = model(**inputs)
            outs.append(out.last_hidden_state if task == "retrieval" else out.logits)
    return outs


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


CASES = {
    # name: (build, expected task, plain class for the dense export)
    "bert-classification": (lambda: tiny_models.tiny_bert(num_labels=3), "classification",
                            transformers.AutoModelForSequenceClassification),
    "gpt2": (tiny_models.tiny_gpt2, "causal-lm", transformers.AutoModelForCausalLM),
    "llama": (tiny_models.tiny_llama, "causal-lm", transformers.AutoModelForCausalLM),
    "bert-retrieval": (tiny_models.tiny_bert, "retrieval", transformers.AutoModel),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_end_to_end(case, tmp_path):
    build, task_name, auto = CASES[case]
    folder = tiny_models.save_tiny(build(), tmp_path / "model")
    options = dict(model=str(folder), samples=12, eval_samples=8, max_length=32, batch_size=4, device="cpu")
    if task_name == "classification":
        options["calib"] = str(write_labelled_csv(tmp_path / "labelled.csv"))
    exp = pipeline.prepare(**options)
    assert exp.task.name == task_name
    assert len(exp.calib.texts) == 12 and len(exp.evaluation.texts) == 8
    assert not set(exp.calib.texts) & set(exp.evaluation.texts)
    pipeline.collect(exp, ["svd", "gfwsvd"])
    assert set(exp.stats) == set(exp.layers)

    measure = case == "gpt2"  # one measured case is enough (one evaluation per layer)
    comp, rep = pipeline.run_compression(exp, "gfwsvd", ratio=0.5, measure=measure)
    for key in REPORT_KEYS:
        assert key in rep, key
    assert rep["method"] == "gfwsvd" and rep["task"] == task_name
    assert set(rep["kept_ratio"]) >= {"layers", "model"}
    assert 0.4 < rep["kept_ratio"]["layers"] <= 0.5 and rep["kept_ratio"]["layers"] < rep["kept_ratio"]["model"] < 1
    assert set(rep["baseline_metrics"]) == set(rep["metrics"])
    assert all(math.isfinite(v) for v in rep["metrics"].values())
    assert len(rep["layers"]) == len(exp.layers)
    for rec in rep["layers"]:
        for key in LAYER_KEYS:
            assert key in rec, key
        assert rec["exact_quadratic"] is not None
        assert math.isfinite(rec["measured_increase"]) if measure else "measured_increase" not in rec
    assert {"statistics", "load_model", "data"} <= set(rep["timings"])
    assert rep["calibration"]["calibration"]["disjoint"] and rep["calibration"]["evaluation"]["disjoint"]
    json.loads(pipeline.write_json(rep, tmp_path / "report.json").read_text())  # JSON-serialisable
    # the experiment's model is untouched, the compressed one is factorised
    assert not any(isinstance(m, LowRankLinear) for m in exp.model.modules())
    assert sum(isinstance(m, LowRankLinear) for m in comp.model.modules()) == len(exp.layers)

    # save -> load gives the same outputs as the in-memory compressed model
    out = save_compressed(comp.model, tmp_path / "compressed", tokenizer=exp.bundle.tokenizer, method=comp.method,
                          source_model=str(folder), calibration=exp.data_record())
    loaded = load_compressed(out)
    ref = model_outputs(comp.model, task_name, exp.eval_batches)
    assert max_diff(model_outputs(loaded, task_name, exp.eval_batches), ref) <= 1e-6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gfwsvd"]["method"] == "gfwsvd"
    assert cfg["gfwsvd"]["ranks"] == {k: v for k, v in comp.ranks.items() if v is not None}
    # the loaded model evaluates to the same metrics
    assert exp.task.evaluate(loaded, exp.eval_batches, exp.reference()) == pytest.approx(rep["metrics"], rel=1e-5)

    # the dense export loads with plain from_pretrained and computes the same function
    dense_dir = export_dense(comp.model, tmp_path / "dense", tokenizer=exp.bundle.tokenizer)
    plain = auto.from_pretrained(str(dense_dir)).eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert max_diff(model_outputs(plain, task_name, exp.eval_batches), ref) <= 1e-5
    assert "gfwsvd" not in json.loads((dense_dir / "config.json").read_text())
    transformers.AutoTokenizer.from_pretrained(str(dense_dir))


def test_ratio_one_through_pipeline_changes_nothing(tmp_path):
    folder = tiny_models.save_tiny(tiny_models.tiny_llama(), tmp_path / "model")
    exp = pipeline.prepare(model=str(folder), samples=6, eval_samples=4, max_length=24, device="cpu")
    pipeline.collect(exp, ["kfac"])
    comp, rep = pipeline.run_compression(exp, "kfac", ratio=1.0)
    assert rep["kept_ratio"] == {"layers": 1.0, "model": 1.0}
    assert rep["metrics"] == rep["baseline_metrics"]
    assert sorted(rep["dense_layers"]) == sorted(exp.layers)
    assert not any(isinstance(m, LowRankLinear) for m in comp.model.modules())


def test_explicit_ranks_through_pipeline(tmp_path):
    folder = tiny_models.save_tiny(tiny_models.tiny_gpt2(), tmp_path / "model")
    exp = pipeline.prepare(model=str(folder), samples=6, eval_samples=4, max_length=24, device="cpu")
    pipeline.collect(exp, ["gfwsvd"])
    ranks = {exp.layers[0]: 2, exp.layers[1]: None}
    comp, rep = pipeline.run_compression(exp, "gfwsvd", ranks=ranks)
    assert [r["layer"] for r in rep["layers"]] == list(ranks)
    assert rep["dense_layers"] == [exp.layers[1]]
    lr = {n: m.rank for n, m in comp.model.named_modules() if isinstance(m, LowRankLinear)}
    assert lr == {exp.layers[0]: 2}
    with pytest.raises(ValueError, match="unknown layer"):
        pipeline.run_compression(exp, "gfwsvd", ranks={"transformer.h.9.attn.c_attn": 2})


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path):
    exp = pipeline.prepare(samples=16, eval_samples=32, max_length=64, device="cpu")
    assert exp.task.name == "retrieval" and len(exp.layers) == 36
    pipeline.collect(exp, ["gfwsvd"])
    comp, rep = pipeline.run_compression(exp, "gfwsvd", ratio=0.5)
    for key in REPORT_KEYS:
        assert key in rep, key
    assert rep["method"] == "gfwsvd" and rep["model"] == "default"
    assert 0.49 < rep["kept_ratio"]["layers"] <= 0.5
    assert rep["kept_ratio"]["layers"] < rep["kept_ratio"]["model"] < 1
    assert set(rep["metrics"]) == {"loss", "top1", "mrr", "fidelity"}
    assert rep["baseline_metrics"]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < rep["metrics"]["fidelity"] < 1
    assert len(rep["layers"]) == 36
    for rec in rep["layers"]:
        for key in LAYER_KEYS + ("relative_error",):
            assert key in rec, key
        assert rec["rank"] in (96, 153)  # 384 x 384 -> 96, 1536 x 384 and 384 x 1536 -> 153
        assert rec["exact_quadratic"] is not None and rec["exact_quadratic"] >= 0
    cal = rep["calibration"]
    assert cal["calibration"]["indices_count"] == 16 and cal["evaluation"]["indices_count"] == 32
    assert cal["calibration"]["parent"]["kind"] == "default" and cal["sample_unit"] == "batch"
    assert rep["timings"]["statistics"] > 0 and rep["timings"]["decompose:gfwsvd"] > 0
    json.loads(pipeline.write_json(rep, tmp_path / "report.json").read_text())
    out = save_compressed(comp.model, tmp_path / "compressed", tokenizer=exp.bundle.tokenizer, method="gfwsvd",
                          source_model="default", calibration=exp.data_record())
    loaded = load_compressed(out)
    batches = exp.eval_batches[:1]
    assert max_diff(model_outputs(loaded, "retrieval", batches), model_outputs(comp.model, "retrieval", batches)) <= 1e-6


def test_prediction_check_beside_measured_and_warned(tmp_path, monkeypatch):
    folder = tiny_models.save_tiny(tiny_models.tiny_gpt2(), tmp_path / "model")
    exp = pipeline.prepare(model=str(folder), samples=6, eval_samples=4, max_length=24, device="cpu")
    pipeline.collect(exp, ["kfac"], extra_kinds=["samples"])
    comp, rep = pipeline.run_compression(exp, "kfac", ratio=0.3)
    check = rep["prediction_check"]
    assert check["predicted_increase"] == pytest.approx(sum(r["exact_quadratic"] for r in rep["layers"]))
    measured = exp.task.measured_loss(comp.model, exp.calib_batches) - exp.task.measured_loss(exp.model, exp.calib_batches)
    assert check["measured_increase"] == pytest.approx(measured, rel=1e-6, abs=1e-9)
    assert check["measured_over_predicted"] == pytest.approx(measured / check["predicted_increase"])
    ratio = check["measured_over_predicted"]
    assert check["agrees"] == (1 / 3 <= ratio <= 3) and (("warning" in check) != check["agrees"])
    # a factor the measured ratio cannot meet: the disagreement is a report warning
    monkeypatch.setattr(pipeline, "AGREEMENT_FACTOR", 1.0 + 1e-12)
    _, rep = pipeline.run_compression(exp, "kfac", ratio=0.3)
    assert not rep["prediction_check"]["agrees"]
    assert rep["warnings"][-1] == rep["prediction_check"]["warning"] and "trust the measured" in rep["warnings"][-1]
    # without per-sample gradients there is no exact yardstick and no check
    pipeline.collect(exp, ["kfac"])
    _, rep = pipeline.run_compression(exp, "kfac", ratio=0.3)
    assert "prediction_check" not in rep


def test_low_fidelity_is_a_report_warning(tmp_path, monkeypatch):
    folder = tiny_models.save_tiny(tiny_models.tiny_bert(), tmp_path / "model")
    exp = pipeline.prepare(model=str(folder), task="retrieval", samples=8, eval_samples=8, max_length=24, device="cpu")
    pipeline.collect(exp, ["svd"])
    _, rep = pipeline.run_compression(exp, "svd", ratio=0.3)
    fid = rep["metrics"]["fidelity"]
    monkeypatch.setattr(pipeline, "FIDELITY_FLAG", fid + 1e-6)
    _, rep = pipeline.run_compression(exp, "svd", ratio=0.3)
    assert [w for w in rep["warnings"] if w.startswith("fidelity")] == [
        f"fidelity {fid:.2f}: the compressed model's outputs are far from the dense model's (mean cosine below "
        f"{fid + 1e-6}); keep more parameters or compare methods in a sweep"]
    monkeypatch.setattr(pipeline, "FIDELITY_FLAG", fid - 1e-6)
    _, rep = pipeline.run_compression(exp, "svd", ratio=0.3)
    assert not [w for w in rep["warnings"] if w.startswith("fidelity")]


def test_reports_carry_paired_bootstrap_intervals(tmp_path):
    folder = tiny_models.save_tiny(tiny_models.tiny_bert(), tmp_path / "model")
    exp = pipeline.prepare(model=str(folder), task="retrieval", samples=8, eval_samples=12, max_length=24, device="cpu")
    pipeline.collect(exp, ["svd"])
    _, rep = pipeline.run_compression(exp, "svd", ratio=0.3)
    iv = rep["intervals"]
    assert iv["examples"] == 12 and iv["level"] == 0.95
    assert set(iv["metrics"]) == set(rep["metrics"]) == set(iv["change"]) == set(iv["resolved"]) == set(iv["baseline"])
    for k, v in rep["metrics"].items():
        lo, hi = iv["metrics"][k]
        assert lo <= v + 1e-12 and v - 1e-12 <= hi, k
        blo, bhi = iv["baseline"][k]
        assert blo <= rep["baseline_metrics"][k] + 1e-12 <= bhi + 2e-12, k
        clo, chi = iv["change"][k]
        assert iv["resolved"][k] == (not clo <= 0 <= chi)
    # the evaluation the intervals come from is the report's: same per-example values
    assert exp.task.aggregate(exp.baseline_values()) == rep["baseline_metrics"]
