"""Tasks: batch layout, the per-sample loss contract, MC Fisher targets, gradients, metrics."""

import math

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from gfwsvd_core.data import default_passages
from gfwsvd_core.layers import linear_layers
from gfwsvd_core.tasks import TASKS, get_task

TEXTS = default_passages()[:10]
LABELS = [i % 3 for i in range(10)]


@pytest.fixture(scope="module")
def tok():
    return tiny_models.tokenizer()


def setup(kind):
    if kind == "retrieval":
        return get_task("retrieval"), tiny_models.tiny_bert(), None
    if kind == "gpt2":
        return get_task("causal-lm"), tiny_models.tiny_gpt2(), None
    if kind == "llama":
        return get_task("causal-lm"), tiny_models.tiny_llama(), None
    return get_task("classification"), tiny_models.tiny_bert(num_labels=3), LABELS


KINDS = ["retrieval", "gpt2", "llama", "classification"]


def test_registry():
    assert TASKS == ("retrieval", "causal-lm", "classification", "probe", "causal-lm-packed")
    for name in TASKS:
        t = get_task(name)
        assert t.name == name and t.primary_metric in t.higher_is_better
    assert get_task("retrieval").default_sample_unit == "batch"
    assert get_task("causal-lm").default_sample_unit == "sequence"
    with pytest.raises(ValueError, match="valid tasks: retrieval, causal-lm, classification, probe, causal-lm-packed"):
        get_task("nope")


def test_retrieval_batches(tok):
    task = get_task("retrieval")
    batches = task.make_batches(tok, TEXTS[:9], max_length=32, batch_size=4)
    assert [b["input_ids"].shape[0] for b in batches] == [8, 10]  # a lone last pair joins the previous batch
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(isinstance(v, torch.Tensor) for v in b.values())
        assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 32
    words = TEXTS[0].split()
    q = tok.decode(batches[0]["input_ids"][0], skip_special_tokens=True)
    p = tok.decode(batches[0]["input_ids"][4], skip_special_tokens=True)
    assert q.split()[0].lower() == words[0].lower() and len(words) // 2 >= 1
    assert q != p
    with pytest.raises(ValueError, match="at least 2 texts"):
        task.make_batches(tok, TEXTS[:1])


def test_causal_and_classification_batches(tok):
    lm = get_task("causal-lm").make_batches(tok, ["a b c d e f", "short"], max_length=16, batch_size=8)
    (b,) = lm
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert torch.equal(b["labels"][b["attention_mask"] == 1], b["input_ids"][b["attention_mask"] == 1])
    cls = get_task("classification")
    (b,) = cls.make_batches(tok, TEXTS[:3], [0, 2, 1], max_length=16)
    assert set(b) == {"input_ids", "attention_mask", "labels"} and b["labels"].tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="needs labels"):
        cls.make_batches(tok, TEXTS[:3])
    with pytest.raises(ValueError, match="one label per text"):
        cls.make_batches(tok, TEXTS[:3], [0, 1])


def _reference_loss(kind, model, batch):
    """The batch loss computed independently (the model's own reductions / a direct formula)."""
    if kind in ("gpt2", "llama"):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        n_targets = int((batch["labels"][:, 1:] != -100).sum())
        return out.loss * n_targets  # the model's mean token loss, times the number of targets
    if kind == "classification":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss * batch["input_ids"].shape[0]
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    B = e.shape[0] // 2
    return F.cross_entropy(20 * e[:B] @ e[B:].T, torch.arange(B))


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_loss_contract(tok, kind):
    task, model, labels = setup(kind)
    texts = TEXTS[:6]
    batch = task.make_batches(tok, texts, None if labels is None else labels[:6], max_length=24, batch_size=6)[0]
    loss = task.fisher_loss(model, batch)
    if kind == "retrieval":
        assert loss.dim() == 0
    else:
        assert loss.shape == (batch["input_ids"].shape[0],)
        assert (loss > 0).all()
    with torch.no_grad():
        ref = _reference_loss(kind, model, batch)
    torch.testing.assert_close(loss.sum().detach(), ref, rtol=1e-4, atol=1e-4)

    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    mc1 = task.fisher_loss(model, batch, fisher="mc", generator=g1)
    mc2 = task.fisher_loss(model, batch, fisher="mc", generator=g2)
    assert mc1.shape == loss.shape
    torch.testing.assert_close(mc1, mc2)
    assert not torch.allclose(mc1, loss)
    with pytest.raises(ValueError, match="valid: empirical, mc"):
        task.fisher_loss(model, batch, fisher="true")

    model.zero_grad()
    loss.sum().backward()
    grads = [m.weight.grad for m in linear_layers(model).values()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_and_measured_loss(tok, kind):
    task, model, labels = setup(kind)
    batches = task.make_batches(tok, TEXTS, labels, max_length=24, batch_size=4)
    ref = task.reference_outputs(model, batches)
    m1 = task.evaluate(model, batches, ref)
    assert m1 == task.evaluate(model, batches, ref)  # deterministic
    assert set(task.higher_is_better) >= set(m1)
    assert m1["loss"] > 0 and math.isfinite(m1["loss"])
    if kind == "retrieval":
        assert set(m1) == {"loss", "top1", "mrr", "fidelity"}
        assert 0 <= m1["top1"] <= m1["mrr"] <= 1
        assert m1["fidelity"] == pytest.approx(1.0, abs=1e-5)
        assert "fidelity" not in task.evaluate(model, batches)
    elif kind == "classification":
        assert set(m1) == {"loss", "accuracy"} and 0 <= m1["accuracy"] <= 1
    else:
        assert set(m1) == {"loss", "perplexity"} and m1["perplexity"] > 1
        assert m1["perplexity"] == pytest.approx(math.exp(m1["loss"]))
    measured = task.measured_loss(model, batches)
    with torch.no_grad():
        per_batch = [task.fisher_loss(model, b) for b in batches]
    expected = sum(float(l.sum()) / (1 if kind == "retrieval" else l.numel()) for l in per_batch) / len(batches)
    assert measured == pytest.approx(expected, rel=1e-5)


def test_retrieval_on_default_model():
    from gfwsvd_core.models import load_model

    bundle = load_model("default", device="cpu")
    task = get_task("retrieval")
    passages = default_passages()
    texts = passages[:: len(passages) // 32][:32]  # spread over the topics; chance top-1 is 1/32
    batches = task.make_batches(bundle.tokenizer, texts, max_length=64, batch_size=16)
    metrics = task.evaluate(bundle.model, batches, task.reference_outputs(bundle.model, batches))
    assert metrics["top1"] > 0.5 and metrics["mrr"] > 0.6
    assert metrics["fidelity"] == pytest.approx(1.0, abs=1e-5)


def test_classification_label_out_of_range(tok):
    task, model, _ = setup("classification")
    (batch,) = task.make_batches(tok, TEXTS[:2], [0, 5])
    with pytest.raises(ValueError, match="out of range"):
        task.fisher_loss(model, batch)


def test_every_metric_a_task_reports_is_explained():
    from gfwsvd_core.tasks import available_tasks, task_class

    for name in available_tasks():
        cls = task_class(name)
        assert set(cls.metric_help) == set(cls.higher_is_better), name
        assert all(len(v) > 20 for v in cls.metric_help.values())
