"""The linear-probe task and the labelled default corpus: deterministic head, exact optimum,
label handling, Fisher contract, and the labelled task end to end."""

import collections
import csv
import json

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from gfwsvd_core import pipeline
from gfwsvd_core.data import TOPIC_MIN_PASSAGES, TextSource, default_passages, load_texts, topic_passages
from gfwsvd_core.layers import linear_layers
from gfwsvd_core.tasks import PROBE_L2, get_task, pooled_embeddings

TEXTS = default_passages()[:24]
NAMES = ["red", "green", "blue"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(scope="module")
def tok():
    return tiny_models.tokenizer()


def fitted(tok, model, labels=None, eval_labels=None):
    task = get_task("probe")
    labels = labels or [NAMES[i % 3] for i in range(16)]
    eval_labels = eval_labels or [NAMES[i % 3] for i in range(8)]
    calib, ev, notes = task.prepare_data(TextSource(TEXTS[:16], labels, {}), TextSource(TEXTS[16:], eval_labels, {}))
    cb = task.make_batches(tok, calib.texts, calib.labels, max_length=24, batch_size=4)
    eb = task.make_batches(tok, ev.texts, ev.labels, max_length=24, batch_size=4)
    record = task.fit(model, cb)
    return task, cb, eb, record, notes


def newton_head(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """The penalised logistic-regression optimum by Newton's method on the full Hessian (float64,
    pseudo-inverse steps: the biases are defined up to a common shift, which both solvers keep at
    zero sum)."""
    d = x.shape[1]
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def f(v):
        w = v.view(classes, d + 1)
        return F.cross_entropy(xb @ w.T, y) + 0.5 * PROBE_L2 * w[:, :d].pow(2).sum()

    v = torch.zeros(classes * (d + 1), dtype=torch.float64)
    for _ in range(100):
        g = torch.autograd.functional.jacobian(f, v)
        if float(g.abs().max()) < 1e-12:
            break
        h = torch.autograd.functional.hessian(f, v)
        step = torch.linalg.pinv(h, hermitian=True) @ g
        t = 1.0
        while f(v - t * step) > f(v) and t > 1e-8:  # backtracking keeps the damped steps descending
            t /= 2
        v = v - t * step
    return v.view(classes, d + 1)


def test_head_is_the_exact_optimum_and_deterministic(tok):
    model = tiny_models.tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task, cb, _, record, _ = fitted(tok, model)
    # the encoder is untouched by the fit
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        x = torch.cat([pooled_embeddings(model, b).double() for b in cb])
    y = torch.cat([b["labels"] for b in cb])
    ref = newton_head(x, y, 3)
    got = torch.cat([task.weight.double(), task.bias.double()[:, None]], 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert record["max_gradient"] < 1e-6 and record["classes"] == sorted(NAMES)
    assert record["examples"] == 16 and 0 <= record["train_accuracy"] <= 1
    again = fitted(tok, model)[3]
    assert again["sha256"] == record["sha256"]  # the same data gives the same head


def test_labels_map_in_sorted_order_and_unseen_labels_are_dropped(tok):
    task = get_task("probe")
    calib, ev, notes = task.prepare_data(TextSource(TEXTS[:4], ["b", "a", "c", "a"], {}),
                                         TextSource(TEXTS[4:8], ["a", "z", "c", "b"], {}))
    assert task.classes == ["a", "b", "c"] and calib.labels == [1, 0, 2, 0]
    assert ev.labels == [0, 2, 1] and ev.texts == [TEXTS[4], TEXTS[6], TEXTS[7]]
    assert ev.description["dropped_unseen_labels"] == 1 and "dropped 1 held-out" in notes[0]
    task.prepare_data(TextSource(TEXTS[:3], [10, 2, 1], {}), TextSource(TEXTS[3:5], [1, 2], {}))
    assert task.classes == [1, 2, 10]  # integers sort as numbers
    with pytest.raises(ValueError, match="needs labelled texts"):
        task.prepare_data(TextSource(TEXTS[:4], None, {}), TextSource(TEXTS[4:8], None, {}))
    with pytest.raises(ValueError, match="only one label"):
        task.prepare_data(TextSource(TEXTS[:4], ["a"] * 4, {}), TextSource(TEXTS[4:8], ["a"] * 4, {}))
    with pytest.raises(ValueError, match="not fitted"):
        get_task("probe").fisher_loss(tiny_models.tiny_bert(), task.make_batches(tok, TEXTS[:2], [0, 1])[0])


def test_fisher_loss_contract_and_metrics(tok):
    model = tiny_models.tiny_bert()
    task, cb, eb, _, _ = fitted(tok, model)
    batch = cb[0]
    loss = task.fisher_loss(model, batch)
    assert loss.shape == (batch["input_ids"].shape[0],) and (loss > 0).all()
    with torch.no_grad():  # direct formula: head on the pooled embeddings
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        ref = F.cross_entropy(e @ task.weight.T + task.bias, batch["labels"], reduction="none")
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mc1, mc2 = (task.fisher_loss(model, batch, "mc", g) for g in (g1, g2))
    torch.testing.assert_close(mc1, mc2)
    model.zero_grad()
    loss.sum().backward()
    grads = [m.weight.grad for m in linear_layers(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    ref_out = task.reference_outputs(model, eb)
    metrics = task.evaluate(model, eb, ref_out)
    assert set(metrics) == {"loss", "accuracy", "fidelity"} and metrics["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert set(task.evaluate(model, eb)) == {"loss", "accuracy"}


def test_labelled_default_corpus():
    texts, labels = topic_passages()
    counts = collections.Counter(labels)
    assert min(counts.values()) >= TOPIC_MIN_PASSAGES and len(counts) >= 5
    everything = default_passages()
    assert set(texts) <= set(everything) and len(texts) == len(set(texts))
    src = load_texts("topics")
    assert src.texts == texts and src.labels == labels
    assert src.description["classes"] == sorted(counts) and src.description["sha256"]
    few = topic_passages(min_passages=60)
    assert set(few[1]) == {k for k, n in counts.items() if n >= 60}
    with pytest.raises(ValueError, match="no columns"):
        load_texts("topics", label_column="y")


def test_probe_end_to_end_on_a_labelled_csv(tmp_path, tok):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["body", "topic"])
        for i, t in enumerate(default_passages()[:48]):
            wr.writerow([t, NAMES[i % 3]])
    folder = tiny_models.save_tiny(tiny_models.tiny_bert(), tmp_path / "bert")
    exp = pipeline.prepare(model=str(folder), task="probe", calib=str(path), text_column="body",
                           label_column="topic", samples=24, eval_samples=24, max_length=32, batch_size=8)
    assert exp.sample_unit == "sequence" and exp.task_setup["classes"] == sorted(NAMES)
    pipeline.collect(exp, methods=("svd", "gfwsvd"), extra_kinds=("samples",))
    comp, rep = pipeline.run_compression(exp, "gfwsvd", ratio=0.5)
    assert rep["task"] == "probe" and set(rep["metrics"]) == {"loss", "accuracy", "fidelity"}
    assert rep["calibration"]["task_setup"]["sha256"] == exp.task_setup["sha256"]
    assert "task_fit" in rep["timings"]
    json.dumps(rep, default=str)
    # the head is not part of the model: neither the dense nor the compressed model holds its weights
    head = exp.task.weight.data_ptr()
    assert all(p.data_ptr() != head for m in (exp.model, comp.model) for p in m.parameters())
    assert sum(p.numel() for p in exp.model.parameters()) == rep["params"]["model_params_before"]


@pytest.mark.slow
def test_probe_on_the_embedded_default():
    exp = pipeline.prepare(task="probe", samples=48, eval_samples=48, max_length=64)
    assert exp.calib.description["parent"]["name"] == "pydoc_data.topics"
    assert exp.calib.description["parent"]["labels"] == "help topic"
    base = exp.baseline_metrics()
    chance = 1 / len(exp.task_setup["classes"])
    assert base["accuracy"] > 2 * chance  # the probe on pretrained embeddings beats chance clearly
    pipeline.collect(exp, methods=("svd",))
    _, rep = pipeline.run_compression(exp, "svd", ratio=0.3)
    assert rep["metrics"]["accuracy"] <= base["accuracy"] + 0.1
    assert rep["intervals"]["metrics"]["accuracy"]
