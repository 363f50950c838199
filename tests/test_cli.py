"""The CLI: compress / evaluate / sweep on a tiny saved model, and every user error path.

User errors must print exactly one line starting with "error:" on stderr (argparse's own usage
error for values of the wrong type) and exit with status 2, never a traceback.
"""

import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

import tiny_models
from gfwsvd_core.cli import main
from gfwsvd_core.io import load_compressed

SMALL = ["--samples", "6", "--eval-samples", "4", "--max-length", "24", "--batch-size", "3", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_models.save_tiny(tiny_models.tiny_gpt2(), tmp_path_factory.mktemp("cli") / "gpt2")


@pytest.fixture(scope="module")
def compressed(tiny_folder, tmp_path_factory):
    """One successful ``gfwsvd compress`` run: (exit code, stdout, export folder, report path)."""
    base = tmp_path_factory.mktemp("cli-out")
    out, report = base / "export", base / "reports" / "report.json"
    o, e = io.StringIO(), io.StringIO()
    with redirect_stdout(o), redirect_stderr(e):  # with progress bars (no --quiet)
        code = main(["compress", "--model", str(tiny_folder), *SMALL, "--method", "gfwsvd", "--ratio", "0.5",
                     "--out", str(out), "--report", str(report)])
    return code, o.getvalue(), e.getvalue(), out, report


def assert_user_error(capsys, code, *fragments):
    """Exit status 2 and exactly one stderr line 'error: ...' (containing the fragments)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])
    return lines[0]


def assert_usage_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "Traceback" not in err
    assert err.startswith("usage: ")
    last = err.strip().splitlines()[-1]
    assert "error:" in last
    for f in fragments:
        assert f in last, (f, last)


# --------------------------------------------------------------------------- success paths


def test_compress_writes_export_and_report(compressed, tiny_folder):
    code, stdout, stderr, out, report = compressed
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "saved to" in stdout and "load_compressed" in stdout
    cfg = json.loads((out / "config.json").read_text())
    block = cfg["gfwsvd"]
    assert block["method"] == "gfwsvd" and block["source_model"] == str(tiny_folder)
    assert len(block["ranks"]) == 8  # every block linear of the 2-layer GPT-2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    rep = json.loads(report.read_text())
    for key in ("method", "kept_ratio", "baseline_metrics", "metrics", "layers", "calibration", "timings"):
        assert key in rep, key
    assert set(rep["kept_ratio"]) == {"layers", "model"}
    assert rep["export"] == str(out)
    assert len(rep["layers"]) == 8 and all(r["rank"] == block["ranks"][r["layer"]] for r in rep["layers"])
    model = load_compressed(out)
    assert sum(type(m).__name__ == "LowRankLinear" for m in model.modules()) == 8


def test_compress_with_ranks_file_and_dense_export(tiny_folder, tmp_path, capsys):
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"transformer.h.0.attn.c_attn": 4, "transformer.h.1.mlp.c_fc": None}))
    out = tmp_path / "export"
    code = main(["compress", "--model", str(tiny_folder), *SMALL, "--method", "svd", "--ranks", str(ranks),
                 "--out", str(out), "--dense", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    assert json.loads((out / "config.json").read_text())["gfwsvd"]["ranks"] == {"transformer.h.0.attn.c_attn": 4}
    dense = Path(str(out) + "-dense")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(dense))


def test_sweep(tiny_folder, tmp_path, capsys):
    report = tmp_path / "sweep.json"
    code = main(["sweep", "--model", str(tiny_folder), *SMALL, "--methods", "svd,kfac", "--ratios", "0.3,1",
                 "--report", str(report), "--out", str(tmp_path / "sweep"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rep = json.loads(report.read_text())
    assert [(r["method"], r["ratio"]) for r in rep["rows"]] == [
        ("dense", 1.0), ("svd", 0.3), ("svd", 1.0), ("kfac", 0.3), ("kfac", 1.0)]
    assert rep["rows"][2]["metrics"] == pytest.approx(rep["rows"][0]["metrics"])  # ratio 1 is the dense model
    assert (tmp_path / "sweep" / "sweep.json").is_file()
    assert "perplexity" in captured.out and "kfac" in captured.out


def test_evaluate_measure(tiny_folder, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--method", "kfac", "--ratio", "0.4", "--measure",
                 "--report", str(report), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rep = json.loads(report.read_text())
    assert len(rep["layers"]) == 8
    for rec in rep["layers"]:
        assert isinstance(rec["measured_increase"], float)
        assert isinstance(rec["exact_quadratic"], float) and rec["predicted_loss"] >= 0
    assert "measured" in captured.out and "transformer.h.1.mlp.c_proj" in captured.out


def test_evaluate_compressed_folder(compressed, tiny_folder, tmp_path, capsys):
    out = compressed[3]
    report = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--compressed", str(out), "--quiet",
                 "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "perplexity" in captured.out
    rep = json.loads(report.read_text())
    first = json.loads(compressed[4].read_text())  # the compress run's own report
    assert rep["method"] == "gfwsvd" and rep["kept_ratio"] == pytest.approx(first["kept_ratio"])
    assert rep["metrics"] == pytest.approx(first["metrics"], rel=1e-5)  # same data, same model
    assert {r["layer"]: r["rank"] for r in rep["layers"]} == {r["layer"]: r["rank"] for r in first["layers"]}


def test_help_in_a_subprocess():
    run = subprocess.run([sys.executable, "-m", "gfwsvd_core", "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for cmd in ("compress", "evaluate", "sweep"):
        assert cmd in run.stdout


def test_user_error_in_a_subprocess(tmp_path):
    run = subprocess.run([sys.executable, "-m", "gfwsvd_core", "compress", "--method", "nope", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown method 'nope'"), run.stderr


# --------------------------------------------------------------------------- error paths


def test_unknown_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["compress", "--model", "no-such-org/no-such-model-xyz", "--out", str(tmp_path / "o")])
    assert_user_error(capsys, code, "no-such-org/no-such-model-xyz", "offline")
    assert not (tmp_path / "o").exists()


def test_unknown_method(tiny_folder, tmp_path, capsys):
    code = main(["compress", "--model", str(tiny_folder), "--method", "nope", "--out", str(tmp_path / "o")])
    line = assert_user_error(capsys, code, "unknown method", "gfwsvd")
    assert "svd" in line
    code = main(["sweep", "--model", str(tiny_folder), "--methods", "svd,nope"])
    assert_user_error(capsys, code, "unknown method")


@pytest.mark.parametrize("ratio", ["0", "1.5", "-1", "abc", "nan", "inf"])
def test_ratio_outside_range(ratio, tmp_path, capsys):
    assert_usage_error(capsys, ["compress", "--ratio", ratio, "--out", str(tmp_path)], "--ratio", "(0, 1]")
    assert_usage_error(capsys, ["evaluate", f"--ratio={ratio}"], "--ratio")
    assert_usage_error(capsys, ["sweep", "--ratios", f"0.5,{ratio}"], "--ratios", "(0, 1]")


def test_bad_integer_and_device(capsys, tmp_path):
    assert_usage_error(capsys, ["compress", "--samples", "0", "--out", str(tmp_path)], "--samples")
    assert_usage_error(capsys, ["compress", "--seed", "-3", "--out", str(tmp_path)], "--seed")
    assert_usage_error(capsys, ["compress", "--device", "floppy", "--out", str(tmp_path)], "--device")
    assert_usage_error(capsys, ["compress"], "--out")  # required
    assert_usage_error(capsys, ["compress", "--ratio", "0.5", "--ranks", "r.json", "--out", str(tmp_path)], "--ranks")


def test_unwritable_outputs_fail_before_any_work(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code = main(["compress", "--model", str(tiny_folder), *SMALL, "--out", str(a_file)])
    assert_user_error(capsys, code, "--out", "existing file")
    code = main(["sweep", "--model", "no-such-org/never-loaded", "--report", str(tmp_path)])
    assert_user_error(capsys, code, "--report", "folder")


def test_empty_calibration_file(tiny_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    code = main(["compress", "--model", str(tiny_folder), "--calib", str(empty), *SMALL, "--out", str(tmp_path / "o")])
    assert_user_error(capsys, code, "empty")
    csv_empty = tmp_path / "empty.csv"
    csv_empty.write_text("")
    code = main(["evaluate", "--model", str(tiny_folder), "--calib", str(csv_empty), *SMALL])
    assert_user_error(capsys, code, "empty")


def test_binary_calibration_file(tiny_folder, tmp_path, capsys):
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01\xff\xfe" * 20)
    code = main(["compress", "--model", str(tiny_folder), "--calib", str(binary), *SMALL, "--out", str(tmp_path / "o")])
    assert_user_error(capsys, code, "binary")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9 au lait"}\n'.encode("latin-1"))
    code = main(["sweep", "--model", str(tiny_folder), "--calib", str(latin), *SMALL])
    assert_user_error(capsys, code, "utf-8")


def test_ranks_file_naming_missing_layer(tiny_folder, tmp_path, capsys):
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"transformer.h.7.attn.c_attn": 4}))
    code = main(["compress", "--model", str(tiny_folder), *SMALL, "--ranks", str(ranks), "--out", str(tmp_path / "o")])
    line = assert_user_error(capsys, code, "transformer.h.7.attn.c_attn")
    assert "transformer.h.0.attn.c_attn" in line  # lists the layers that exist
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"transformer.h.0.attn.c_attn": 0}', "transformer.h.0.attn.c_attn"),
    ('{"transformer.h.0.attn.c_attn": "four"}', "integer"),
])
def test_bad_ranks_files(tiny_folder, tmp_path, capsys, content, fragment):
    ranks = tmp_path / "ranks.json"
    ranks.write_text(content)
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--ranks", str(ranks)])
    assert_user_error(capsys, code, fragment)
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--ranks", str(tmp_path / "missing.json")])
    assert_user_error(capsys, code, "does not exist")


def _copy_export(compressed, tmp_path):
    code, _, _, out, _ = compressed
    assert code == 0
    return Path(shutil.copytree(out, tmp_path / "export"))


def test_tampered_export_rank(compressed, tiny_folder, tmp_path, capsys):
    folder = _copy_export(compressed, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    layer = next(iter(cfg["gfwsvd"]["ranks"]))
    cfg["gfwsvd"]["ranks"][layer] += 1
    (folder / "config.json").write_text(json.dumps(cfg))
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--compressed", str(folder)])
    assert_user_error(capsys, code, layer, "rank")


def test_tampered_export_truncated_weights(compressed, tiny_folder, tmp_path, capsys):
    folder = _copy_export(compressed, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--compressed", str(folder)])
    assert_user_error(capsys, code, "model.safetensors")


def test_tampered_export_other_damage(compressed, tiny_folder, tmp_path, capsys):
    folder = _copy_export(compressed, tmp_path)
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--compressed", str(tmp_path / "nowhere")])
    assert_user_error(capsys, code, "does not exist")
    (folder / "config.json").write_text("{ broken")
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--compressed", str(folder)])
    assert_user_error(capsys, code, "config.json")
    # a plain model folder is not an export
    code = main(["evaluate", "--model", str(tiny_folder), *SMALL, "--compressed", str(tiny_folder)])
    assert_user_error(capsys, code, "not a gfwsvd export")


def test_export_from_another_model(compressed, tmp_path, capsys):
    other = tiny_models.save_tiny(tiny_models.tiny_gpt2(hidden=16), tmp_path / "other")
    code = main(["evaluate", "--model", str(other), *SMALL, "--compressed", str(compressed[3])])
    assert_user_error(capsys, code, "does not come from model")


def test_study_writes_json_and_markdown_with_resolved_winners_only(tiny_folder, tmp_path, capsys):
    import json

    from gfwsvd_core.study import summarise

    out = tmp_path / "study"
    code = main(["study", "--model", str(tiny_folder), *SMALL, "--methods", "svd,kfac", "--ratios", "0.3,0.6",
                 "--seeds", "0,1", "--out", str(out), "--quiet"])
    assert code == 0
    study = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert capsys.readouterr().out.strip() == md.strip()
    assert study["seeds"] == [0, 1] and [r["seed"] for r in study["runs"]] == [0, 1]
    # the seeds re-drew the texts: different calibration metrics of the dense model
    d0, d1 = (r["rows"][0]["metrics"] for r in study["runs"])
    assert d0 != d1
    for metric, table in study["table"].items():
        for ratio in ("0.3", "0.6"):
            for m in ("svd", "kfac"):
                vals = [x["metrics"][metric] for r in study["runs"] for x in r["rows"]
                        if x["method"] == m and abs(x["ratio"] - float(ratio)) < 1e-12]
                c = table["by_ratio"][ratio][m]
                assert c["mean"] == pytest.approx(sum(vals) / 2) and c["min"] == min(vals) and c["max"] == max(vals)
            w = table["winner"][ratio]
            verdicts = [next(x["comparison"][metric] for x in r["rows"] if x.get("comparison")
                             and abs(x["ratio"] - float(ratio)) < 1e-12) for r in study["runs"]]
            assert (w is not None) == (verdicts[0]["best"] == verdicts[1]["best"] and all(v["all_resolved"] for v in verdicts))
        assert f"**{metric}**" in md
    assert summarise(study["runs"], study["methods"], study["ratios"]) == study["table"]
    assert main(["study", "--model", str(tiny_folder), *SMALL, "--seeds", "x", "--out", str(out)]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
