"""lm-evaluation-harness as a library (``gfwsvd_core.harness`` and ``gfwsvd evaluate --lm-eval``).

Offline: a local YAML task (``loglikelihood_rolling`` perplexity over a JSONL file written here)
on tiny decoders built from configs. The harness' perplexities are checked against a direct
forward pass over the same documents, on the dense and on a compressed (LowRankLinear) model.
"""

import json
import math
import re
import sys

import pytest
import torch

import tiny_models
from gfwsvd_core.cli import main
from gfwsvd_core.errors import ConfigurationError, DataError

DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny decoder reads a few short documents one after another",
    "perplexity of random weights is large but finite",
    "low rank factors keep most of what matters",
    "fisher weights say which directions the loss is sensitive to",
]
TASK = "gfwsvd_tiny_ppl"
SMALL = ["--samples", "6", "--eval-samples", "4", "--max-length", "24", "--batch-size", "3", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def harness():
    reason = 'lm-evaluation-harness is not installed; install the extra: pip install -e ".[test,lm-eval]"'
    pytest.importorskip("lm_eval", reason=reason)
    pytest.importorskip("accelerate", reason=reason)
    from gfwsvd_core import harness

    return harness


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with one local YAML task: rolling log-likelihood perplexity over a JSONL file."""
    base = tmp_path_factory.mktemp("lm-eval")
    data = base / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    tasks = base / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
        "metadata:\n"
        "  version: 1.0\n", encoding="utf-8")
    return tasks


@pytest.fixture(scope="module")
def broken_dir(task_dir, tmp_path_factory):
    """A folder with one local task whose JSONL file does not exist."""
    broken = tmp_path_factory.mktemp("lm-eval-broken")
    text = (task_dir / f"{TASK}.yaml").read_text(encoding="utf-8")
    (broken / "broken.yaml").write_text(text.replace(f"task: {TASK}", "task: gfwsvd_broken").replace(
        "docs.jsonl", "missing.jsonl"), encoding="utf-8")
    return broken


@pytest.fixture(scope="module")
def manager(harness, task_dir):
    return harness.task_manager(task_dir, [TASK])


def direct_metrics(model, tokenizer, docs) -> dict:
    """Word / byte perplexity and bits per byte from one forward pass per document.

    Each document is tokenized as lm_eval does (the tokenizer's default special tokens) and
    scored in one window after a prefix token (the model config's BOS: the BERT vocabulary of the
    tiny models has no BOS or EOS); words are whitespace-separated, bytes UTF-8 bytes.
    """
    prefix = model.config.bos_token_id
    total = words = nbytes = 0.0
    with torch.no_grad():
        for doc in docs:
            ids = tokenizer.encode(doc)
            window = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
            assert len(ids) <= window  # one window: no rolling context to reproduce
            inputs = torch.tensor([[prefix] + ids[:-1]])
            logp = torch.log_softmax(model(inputs).logits[0].double(), dim=-1)
            total += logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
            words += len(re.split(r"\s+", doc))
            nbytes += len(doc.encode("utf-8"))
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
            "bits_per_byte": -total / nbytes / math.log(2)}


def _metrics(result: dict) -> dict:
    return result["tasks"][TASK]["metrics"]


def test_perplexity_matches_a_direct_forward_pass(harness, manager, task_dir):
    model, tok = tiny_models.tiny_gpt2(), tiny_models.tokenizer()
    res = harness.run_lm_eval(model, tok, TASK, include_path=task_dir, batch_size=2, quiet=True, manager=manager)
    json.dumps(res, allow_nan=False)  # JSON-ready
    rec = res["tasks"][TASK]
    assert rec["examples"] == len(DOCS) and rec["num_fewshot"] == 0
    assert set(rec["metrics"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert rec["higher_is_better"] == dict.fromkeys(rec["metrics"], False)
    assert res["sources"][TASK].endswith(f"{TASK}.yaml") and res["limit"] is None
    import lm_eval

    assert res["lm_eval_version"] == lm_eval.__version__
    want = direct_metrics(model, tok, DOCS)
    for k, v in want.items():
        assert rec["metrics"][k] == pytest.approx(v, rel=1e-4), k
    # the untrained model is close to uniform over the vocabulary: a sanity scale for the figures
    assert 1e3 < rec["metrics"]["word_perplexity"] < 1e8

    limited = harness.run_lm_eval(model, tok, [TASK], limit=2, batch_size=3, quiet=True, manager=manager)
    assert limited["limit"] == 2 and limited["tasks"][TASK]["examples"] == 2
    for k, v in direct_metrics(model, tok, DOCS[:2]).items():
        assert _metrics(limited)[k] == pytest.approx(v, rel=1e-4), k


def test_compressed_model(harness, manager, task_dir, tmp_path):
    """A tiny LLaMA compressed by the pipeline: the harness scores its LowRankLinear layers exactly
    as a direct forward pass does, and the perplexity moves away from the dense model's."""
    from gfwsvd_core import pipeline
    from gfwsvd_core.factorized import LowRankLinear

    folder = tiny_models.save_tiny(tiny_models.tiny_llama(), tmp_path / "llama")
    exp = pipeline.prepare(model=str(folder), samples=6, eval_samples=4, max_length=24, batch_size=3, device="cpu")
    pipeline.collect(exp, methods=["svd"])
    comp, _ = pipeline.run_compression(exp, "svd", ratio=0.3, evaluate=False)
    assert any(isinstance(m, LowRankLinear) for m in comp.model.modules())
    tok = exp.bundle.tokenizer
    dense = _metrics(harness.run_lm_eval(exp.model, tok, TASK, batch_size=4, quiet=True, manager=manager))
    low = _metrics(harness.run_lm_eval(comp.model, tok, TASK, batch_size=4, quiet=True, manager=manager))
    for k, v in direct_metrics(comp.model, tok, DOCS).items():
        assert low[k] == pytest.approx(v, rel=1e-4), k
    # an untrained model is near-uniform, so compression moves it little; still well beyond the
    # 1e-4 at which harness and direct computation agree (the agreement is ~1e-7 measured)
    for k in dense:
        assert math.isfinite(low[k]) and low[k] > 0
        assert abs(low[k] / dense[k] - 1) > 2e-4, (k, low[k], dense[k])


def test_errors(harness, manager, task_dir, broken_dir, tmp_path, monkeypatch):
    model, tok = tiny_models.tiny_gpt2(), tiny_models.tokenizer()
    with pytest.raises(ConfigurationError, match=f"unknown lm-eval task 'gfwsvd_tiny_pp'.*close matches: {TASK}"):
        harness.run_lm_eval(model, tok, "gfwsvd_tiny_pp", manager=manager)
    with pytest.raises(ConfigurationError, match="does not exist"):
        harness.run_lm_eval(model, tok, TASK, include_path=tmp_path / "nowhere")
    with pytest.raises(ConfigurationError, match="no .yaml task config"):
        harness.check_include_path(tmp_path)
    with pytest.raises(ConfigurationError, match="no lm-eval task"):
        harness.parse_tasks(" , ")
    with pytest.raises(ConfigurationError, match="causal language model.*BertModel"):
        harness.run_lm_eval(tiny_models.tiny_bert(), tok, TASK, manager=manager)
    with pytest.raises(DataError, match="gfwsvd_broken cannot be loaded.*missing.jsonl"):
        harness.run_lm_eval(model, tok, "gfwsvd_broken", include_path=broken_dir, quiet=True)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r'pip install "gfwsvd\[lm-eval\]"'):
        harness.run_lm_eval(model, tok, TASK, include_path=task_dir)
    assert not harness.lm_eval_available()


def test_missing_harness_without_lm_eval(monkeypatch, capsys):
    """Runs without lm_eval installed too: the library imports and the CLI says what to install."""
    from gfwsvd_core import harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigurationError, match=r'pip install "gfwsvd\[lm-eval\]"'):
        harness.task_manager()
    code = main(["evaluate", "--model", "no-such-org/never-loaded", "--lm-eval", "wikitext"])
    line = _user_error(capsys, code)
    assert 'pip install "gfwsvd[lm-eval]"' in line


def _user_error(capsys, code) -> str:
    """Exit status 2 and exactly one stderr line 'error: ...'."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


NEVER = ["evaluate", "--model", "no-such-org/never-loaded"]  # loading it would fail with another error


@pytest.mark.slow
def test_cli_unknown_task_fails_before_loading(harness, task_dir, capsys):
    """Slow: a name the include folder lacks is looked up among the installed tasks too, and
    indexing those parses every task config of lm_eval (~20 s here)."""
    line = _user_error(capsys, main([*NEVER, "--lm-eval", "gfwsvd_tiny_pp", "--lm-eval-include", str(task_dir)]))
    assert "unknown lm-eval task 'gfwsvd_tiny_pp'" in line and TASK in line


def test_cli_flag_errors_fail_before_loading(harness, task_dir, broken_dir, tmp_path, capsys):
    line = _user_error(capsys, main([*NEVER, "--lm-eval", TASK, "--lm-eval-include", str(tmp_path / "nowhere")]))
    assert "nowhere" in line and "does not exist" in line
    line = _user_error(capsys, main([*NEVER, "--lm-eval", "gfwsvd_broken", "--lm-eval-include", str(broken_dir)]))
    assert "cannot be loaded" in line and "missing.jsonl" in line
    line = _user_error(capsys, main([*NEVER, "--lm-eval-limit", "3"]))
    assert "need --lm-eval" in line
    bert = tiny_models.save_tiny(tiny_models.tiny_bert(), tmp_path / "bert")
    line = _user_error(capsys, main(["evaluate", "--model", str(bert), *SMALL, "--lm-eval", TASK,
                                     "--lm-eval-include", str(task_dir), "--quiet"]))
    assert "causal language model" in line


def test_cli_dense_and_compressed(harness, task_dir, tmp_path, capsys):
    """``evaluate --lm-eval`` in memory (exporting the model) and on the export: the report holds
    dense and compressed results, the dense one equals a direct forward pass, and the export's
    results equal the in-memory model's."""
    folder = tiny_models.save_tiny(tiny_models.tiny_gpt2(seed=1), tmp_path / "gpt2")
    lm = ["--lm-eval", TASK, "--lm-eval-include", str(task_dir), "--lm-eval-limit", "3", "--quiet"]
    out, first, second = tmp_path / "export", tmp_path / "first.json", tmp_path / "second.json"
    code = main(["evaluate", "--model", str(folder), *SMALL, "--method", "svd", "--ratio", "0.4", *lm,
                 "--out", str(out), "--report", str(first)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "word_perplexity" in captured.out and "compressed" in captured.out
    rep = json.loads(first.read_text())["lm_eval"]
    assert set(rep) == {"dense", "compressed"}
    for side in rep.values():
        assert side["limit"] == 3 and side["tasks"][TASK]["examples"] == 3
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    for k, v in direct_metrics(dense, tiny_models.tokenizer(), DOCS[:3]).items():
        assert _metrics(rep["dense"])[k] == pytest.approx(v, rel=1e-4), k
    assert _metrics(rep["compressed"])["word_perplexity"] != pytest.approx(_metrics(rep["dense"])["word_perplexity"],
                                                                           rel=1e-3)

    code = main(["evaluate", "--model", str(folder), *SMALL, "--compressed", str(out), *lm, "--report", str(second)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    again = json.loads(second.read_text())["lm_eval"]
    for side in ("dense", "compressed"):
        assert _metrics(again[side]) == pytest.approx(_metrics(rep[side]), rel=1e-5), side
