"""Tasks: how texts become batches, which loss defines the Fisher, and which metrics to report.

Each task is one small class on :class:`Task`:

* ``make_batches``  - texts (and labels) -> list of plain dicts of tensors;
* ``fisher_loss``   - the loss whose gradients define the Fisher. Per-sample losses ``(B,)`` for
  causal LM and classification (so per-sample gradients are exact whatever the model's own
  reduction); a scalar for retrieval, whose InfoNCE loss couples the batch (sample unit: batch);
* ``evaluate``      - deterministic held-out metrics (``reference_outputs`` of the uncompressed
  model feed fidelity metrics);
* ``measured_loss`` - the calibration loss whose change is compared with predicted increases.

``fisher="empirical"`` uses the data targets; ``fisher="mc"`` samples targets from the model's
own predictive distribution (the true Fisher in expectation).
"""

from __future__ import annotations

import abc

import contextlib
import hashlib
import inspect
import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigurationError, DataError

FISHER_KINDS = ("empirical", "mc")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------- helpers


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_inputs(model: nn.Module, batch: dict) -> dict[str, Tensor]:
    """The batch entries the model's forward accepts (input_ids, attention_mask, token_type_ids)."""
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    dev = _device(model)
    out = {}
    for k in _MODEL_INPUTS:
        if k in batch and (k in params or (takes_kwargs and k != "token_type_ids")):
            out[k] = batch[k].to(dev)
    return out


def _check_fisher(fisher: str) -> None:
    if fisher not in FISHER_KINDS:
        raise ConfigurationError(f"unknown fisher {fisher!r}; valid: {', '.join(FISHER_KINDS)}")


def _sample(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One draw per row of ``probs`` (R, C) -> (R,), on the generator's device if it has one."""
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _chunks(n: int, size: int) -> list[range]:
    if size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, got {size}")
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    if not texts:
        raise DataError("no texts to batch; pass at least one text")
    if not all(isinstance(t, str) for t in texts):
        raise DataError("texts must be strings; pass a list of str")
    return texts


def pooled_embeddings(model: nn.Module, batch: dict) -> Tensor:
    """Mean-pooled (over the attention mask), L2-normalised last hidden states, (rows, d) float32."""
    inputs = _model_inputs(model, batch)
    out = model(**inputs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:  # e.g. a causal LM used as an encoder
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (R, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (R, d)
    return F.normalize(pooled.float(), dim=-1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Evaluation mode and no gradients for the duration; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- base class


class Task(abc.ABC):
    """Base class: one subclass per task; instances are stateless."""

    name: str = ""
    label: str = ""  # display name
    description: str = ""
    default_sample_unit: str = "sequence"
    #: what one Fisher sample may be for this task's loss (checked in ``pipeline.prepare``)
    sample_units: tuple[str, ...] = ("token", "sequence", "batch")
    #: transformers Auto class that loads a model for this task
    auto_model: str = "AutoModel"
    #: ``config.architectures`` suffixes that select this task (empty: the fallback task)
    architectures: tuple[str, ...] = ()
    #: the smallest number of words a text needs to be usable by this task
    min_words: int = 1

    #: the data source used when the user asks for the embedded default (None: "default" itself)
    default_calib: Optional[str] = None

    @classmethod
    def prepare_tokenizer(cls, tokenizer, name: str = "") -> None:
        """Adjust a freshly loaded tokenizer for this task's batches (nothing by default)."""

    def prepare_data(self, calib, evaluation) -> tuple[Any, Any, list[str]]:
        """Adjust the calibration and evaluation sources before batching (e.g. map label names
        to class ids); returns them and notes for the report. Nothing by default."""
        return calib, evaluation, []

    def fit(self, model: nn.Module, batches: Sequence[dict]) -> Optional[dict]:
        """Fit what the task needs beyond the model on the dense model's calibration batches (e.g.
        a probe head); returns a JSON-ready record of the fit for the report, or None."""
        return None

    higher_is_better: dict[str, bool] = {}
    metric_help: dict[str, str] = {}  # one line per metric: what it measures (shown beside it)
    primary_metric: str = "loss"

    @abc.abstractmethod
    def make_batches(self, tokenizer, texts: Sequence[str], labels: Optional[Sequence] = None,
                     max_length: int = 128, batch_size: int = 8) -> list[dict[str, Tensor]]:
        """Implemented by each task."""

    @abc.abstractmethod
    def fisher_loss(self, model: nn.Module, batch: dict, fisher: str = "empirical",
                    generator: Optional[torch.Generator] = None) -> Tensor:
        """Implemented by each task."""

    def reference_outputs(self, model: nn.Module, batches: Sequence[dict]) -> Any:
        """Outputs of the (uncompressed) model that fidelity metrics compare with; None here."""
        return None

    @abc.abstractmethod
    def example_values(self, model: nn.Module, batches: Sequence[dict], reference: Any = None) -> dict[str, Tensor]:
        """Per held-out example, the values its metrics aggregate: ``{name: (N,) tensor}``, one entry
        per example in batch order (implemented by each task). Resampling examples gives the
        metrics' bootstrap intervals (:func:`gfwsvd_core.yardstick.metric_intervals`)."""

    def aggregate(self, values: Mapping[str, Tensor]) -> dict[str, float]:
        """Metrics from per-example values (by default each metric is the mean of its values)."""
        return {k: float(v.double().mean()) for k, v in values.items()}

    def evaluate(self, model: nn.Module, batches: Sequence[dict], reference: Any = None) -> dict[str, float]:
        """The task's metrics on held-out batches: ``aggregate(example_values(...))``."""
        return self.aggregate(self.example_values(model, batches, reference))

    def measured_loss(self, model: nn.Module, batches: Sequence[dict]) -> float:
        """Mean over batches of the empirical loss per sample (per pair for retrieval).

        This is the loss of which the Fisher is the curvature (one sample = one sequence, or one
        batch for retrieval), so its increase is what predicted loss increases estimate.
        """
        if not batches:
            raise DataError("no batches to measure the loss on")
        total = 0.0
        with _eval_mode(model):
            for b in batches:
                loss = self.fisher_loss(model, b, fisher="empirical")
                total += float(loss.mean()) if loss.dim() else float(loss)
        return total / len(batches)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------- retrieval


class RetrievalTask(Task):
    """Passage retrieval: query = first half of a passage's words, positive = second half.

    Embeddings are mean-pooled over the attention mask and L2-normalised; the loss is InfoNCE
    query -> passage with in-batch negatives at temperature 0.05. A batch of B pairs holds the
    stacked ``[queries; positives]`` (2B rows, queries first).
    """

    name = "retrieval"
    label = "Retrieval (encoder)"
    description = "InfoNCE between the halves of each text, in-batch negatives; bare encoders."
    default_sample_unit = "batch"
    sample_units = ("token", "batch")  # the InfoNCE loss couples the batch: no per-sequence loss
    min_words = 2  # split into a query and a passage
    higher_is_better = {"loss": False, "top1": True, "mrr": True, "fidelity": True}
    metric_help = {
        "loss": "InfoNCE of each query against every held-out passage at temperature 0.05: a training "
                "objective, not a quality score; it can improve while retrieval gets worse",
        "top1": "share of held-out queries whose own passage scores highest among all held-out passages",
        "mrr": "mean of 1 / (rank of the query's own passage) over held-out queries",
        "fidelity": "mean cosine between the compressed and the dense model's embeddings of the same texts "
                    "(1 = unchanged)",
    }
    primary_metric = "top1"
    temperature = 0.05

    def make_batches(self, tokenizer, texts, labels=None, max_length=128, batch_size=8):
        texts = _check_texts(texts)
        pairs = []
        for i, t in enumerate(texts):
            words = t.split()
            if len(words) < 2:
                raise DataError(f"text {i} has fewer than 2 words; retrieval needs texts it can split into query and passage")
            half = len(words) // 2
            pairs.append((" ".join(words[:half]), " ".join(words[half:])))
        if len(pairs) < 2:
            raise DataError("retrieval needs at least 2 texts (in-batch negatives); pass more texts")
        chunks = _chunks(len(pairs), max(batch_size, 2))
        if len(chunks) > 1 and len(chunks[-1]) < 2:  # a lone pair has no negative: join the previous batch
            chunks[-2] = range(chunks[-2].start, chunks[-1].stop)
            chunks.pop()
        batches = []
        for idx in chunks:
            rows = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
            enc = tokenizer(rows, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batches.append({k: enc[k] for k in _MODEL_INPUTS if k in enc})
        return batches

    def embed(self, model: nn.Module, batch: dict) -> Tensor:
        """Mean-pooled, L2-normalised embeddings of every row of the batch, (rows, d)."""
        return pooled_embeddings(model, batch)

    def _split(self, model, batch) -> tuple[Tensor, Tensor]:
        e = self.embed(model, batch)  # (2B, d)
        if e.shape[0] % 2:
            raise ValueError("a retrieval batch must hold [queries; positives] with an even number of rows")
        b = e.shape[0] // 2
        return e[:b], e[b:]

    def fisher_loss(self, model, batch, fisher="empirical", generator=None):
        _check_fisher(fisher)
        q, p = self._split(model, batch)
        logits = q @ p.T / self.temperature  # (B, B): 20 * cosine
        if fisher == "empirical":
            target = torch.arange(q.shape[0], device=logits.device)
        else:
            target = _sample(torch.softmax(logits.detach(), dim=-1), generator)
        return F.cross_entropy(logits, target)

    def reference_outputs(self, model, batches):
        """(queries, passages) embeddings over the whole evaluation set, on CPU."""
        qs, ps = [], []
        with _eval_mode(model):
            for b in batches:
                q, p = self._split(model, b)
                qs.append(q.cpu())
                ps.append(p.cpu())
        return torch.cat(qs), torch.cat(ps)

    def example_values(self, model, batches, reference=None):
        """Per query: InfoNCE loss, top-1 and reciprocal rank against the fixed pool of all
        evaluation positives; per pair, the mean fidelity of its query and its passage."""
        if not batches:
            raise DataError("no evaluation batches")
        q, p = self.reference_outputs(model, batches)  # (N, d) each
        scores = q @ p.T  # (N, N) cosines
        n = scores.shape[0]
        target = torch.arange(n)
        correct = scores[target, target]
        rank = 1 + (scores > correct[:, None]).sum(1)  # strict: ties favour the positive
        out = {"loss": F.cross_entropy(scores / self.temperature, target, reduction="none"),
               "top1": (rank == 1).float(), "mrr": 1.0 / rank.float()}
        if reference is not None:
            rq, rp = reference
            if rq.shape != q.shape or rp.shape != p.shape:
                raise ValueError("the reference embeddings come from other batches; compute them on the same batches")
            out["fidelity"] = 0.5 * ((q * rq).sum(-1) + (p * rp).sum(-1))
        return out


# --------------------------------------------------------------------------- causal LM


class CausalLMTask(Task):
    """Next-token prediction; per-sample loss = the sequence's summed token cross-entropy."""

    name = "causal-lm"
    label = "Causal language modelling"
    description = "Next-token cross-entropy on the text itself; decoders with an LM head."
    auto_model = "AutoModelForCausalLM"
    architectures = ("ForCausalLM", "LMHeadModel")

    @classmethod
    def prepare_tokenizer(cls, tokenizer, name: str = "") -> None:
        """A pad token (eos, else unk) and right padding, so padded positions can be masked."""
        if tokenizer.pad_token is None:
            pad = tokenizer.eos_token or tokenizer.unk_token
            if pad is None:
                raise ConfigurationError(f"tokenizer of {name!r} has no pad, eos or unk token; set tokenizer.pad_token yourself")
            tokenizer.pad_token = pad
        tokenizer.padding_side = "right"
    default_sample_unit = "sequence"
    higher_is_better = {"loss": False, "perplexity": False}
    metric_help = {"loss": "mean next-token cross-entropy on held-out texts",
                   "perplexity": "exp(loss): the effective number of equally likely next tokens"}
    primary_metric = "perplexity"

    def make_batches(self, tokenizer, texts, labels=None, max_length=128, batch_size=8):
        texts = _check_texts(texts)
        if tokenizer.pad_token is None:
            raise DataError("the tokenizer has no pad token; set tokenizer.pad_token (load_model does it)")
        batches = []
        for idx in _chunks(len(texts), batch_size):
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        return batches

    def _token_nll(self, model, batch, fisher="empirical", generator=None) -> tuple[Tensor, Tensor]:
        """Per-token NLL (B, T-1), zero at invalid targets, and the valid-target mask."""
        inputs = _model_inputs(model, batch)
        logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
        if "labels" in batch:
            targets = batch["labels"].to(logits.device)[:, 1:]
        else:
            targets = inputs["input_ids"][:, 1:].masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
        valid = targets != -100  # (B, T-1)
        if fisher == "mc":
            probs = torch.softmax(logits.detach(), dim=-1).flatten(0, 1)  # (B*(T-1), V)
            sampled = _sample(probs, generator).view_as(targets)
            targets = sampled.masked_fill(~valid, -100)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (B, T-1)
        return nll, valid

    def fisher_loss(self, model, batch, fisher="empirical", generator=None):
        _check_fisher(fisher)
        nll, _ = self._token_nll(model, batch, fisher, generator)
        return nll.sum(1)  # (B,)

    def example_values(self, model, batches, reference=None):
        """Per held-out text: its summed next-token NLL and its number of targets."""
        if not batches:
            raise DataError("no evaluation batches")
        sums, counts = [], []
        with _eval_mode(model):
            for b in batches:
                nll, valid = self._token_nll(model, b)
                sums.append(nll.detach().double().sum(1).cpu())
                counts.append(valid.sum(1).double().cpu())
        return {"nll_sum": torch.cat(sums), "targets": torch.cat(counts)}

    def aggregate(self, values):
        """Mean token NLL over all valid targets and its perplexity."""
        count = float(values["targets"].sum())
        if count == 0:
            raise DataError("the evaluation texts have no next-token targets; use longer texts")
        loss = float(values["nll_sum"].sum()) / count
        return {"loss": loss, "perplexity": math.exp(loss)}


class PackedCausalLMTask(CausalLMTask):
    """Causal LM on packed windows, as LLM compression papers calibrate and evaluate: the texts are
    tokenised, joined by the EOS token into one stream and cut into full windows of ``max_length``
    tokens (the last partial window is dropped), so no token is padding and every window is one
    Fisher sample. ``--samples`` still counts texts; the windows they fill are what is used."""

    name = "causal-lm-packed"
    label = "Causal language modelling, packed windows"
    description = "Next-token cross-entropy on full windows of the joined texts (no padding), as the papers use."
    architectures = ()  # chosen explicitly; a bare decoder defaults to causal-lm

    def make_batches(self, tokenizer, texts, labels=None, max_length=128, batch_size=8):
        texts = _check_texts(texts)
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        stream: list[int] = []
        for t in texts:
            stream += tokenizer(t, add_special_tokens=False)["input_ids"]
            if sep is not None:
                stream.append(sep)
        n = len(stream) // max_length
        if n == 0:
            raise DataError(f"the texts have {len(stream)} tokens together, fewer than one window of {max_length}; "
                            "give more text or a smaller --max-length")
        ids = torch.tensor(stream[: n * max_length]).view(n, max_length)
        return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": ids[i].clone()}
                for i in _chunks(n, batch_size)]


# --------------------------------------------------------------------------- classification


class ClassificationTask(Task):
    """Sequence classification with integer labels; per-sample cross-entropy."""

    name = "classification"
    label = "Sequence classification"
    description = "Cross-entropy on the labels of a sequence-classification head."
    auto_model = "AutoModelForSequenceClassification"
    architectures = ("ForSequenceClassification",)
    default_sample_unit = "sequence"
    higher_is_better = {"loss": False, "accuracy": True}
    metric_help = {"loss": "mean cross-entropy of the true labels on held-out texts",
                   "accuracy": "share of held-out texts whose predicted label is the true one"}
    primary_metric = "accuracy"

    def make_batches(self, tokenizer, texts, labels=None, max_length=128, batch_size=8):
        texts = _check_texts(texts)
        if labels is None:
            raise DataError("classification needs labels; pass data with a label column")
        labels = list(labels)
        if len(labels) != len(texts):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
        if not all(isinstance(y, int) and not isinstance(y, bool) and y >= 0 for y in labels):
            raise DataError("classification labels must be non-negative integers; map label names to ids first")
        batches = []
        for idx in _chunks(len(texts), batch_size):
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": torch.tensor([labels[i] for i in idx], dtype=torch.long)})
        return batches

    def _logits(self, model, batch) -> tuple[Tensor, Tensor]:
        logits = model(**_model_inputs(model, batch)).logits.float()  # (B, C)
        labels = batch["labels"].to(logits.device)
        if int(labels.max()) >= logits.shape[-1]:
            raise DataError(
                f"label {int(labels.max())} is out of range for a model with {logits.shape[-1]} classes; "
                "check the label column or load the model with matching num_labels"
            )
        return logits, labels

    def fisher_loss(self, model, batch, fisher="empirical", generator=None):
        _check_fisher(fisher)
        logits, labels = self._logits(model, batch)
        if fisher == "mc":
            labels = _sample(torch.softmax(logits.detach(), dim=-1), generator)
        return F.cross_entropy(logits, labels, reduction="none")  # (B,)

    def example_values(self, model, batches, reference=None):
        """Per held-out text: cross-entropy of its label and whether the prediction is right."""
        if not batches:
            raise DataError("no evaluation batches")
        losses, correct = [], []
        with _eval_mode(model):
            for b in batches:
                logits, labels = self._logits(model, b)
                losses.append(F.cross_entropy(logits, labels, reduction="none").detach().cpu())
                correct.append((logits.argmax(-1) == labels).float().cpu())
        return {"loss": torch.cat(losses), "accuracy": torch.cat(correct)}


# --------------------------------------------------------------------------- linear probe

#: L2 penalty of the probe head on the mean cross-entropy (features are unit vectors)
PROBE_L2 = 1e-3
PROBE_MAX_ITER = 500


class ProbeTask(ClassificationTask):
    """Classification of texts by a linear head on the frozen encoder's embeddings.

    For encoders without a trained classification head (the embedded default among them): the
    head is a multinomial logistic regression on the dense model's mean-pooled, L2-normalised
    embeddings of the calibration texts, fitted once in float64 by L-BFGS from zero (a convex
    problem, so the fit is deterministic) with an L2 penalty ``PROBE_L2``. The head is never
    compressed: compression changes the encoder, and the Fisher is the curvature of the head's
    cross-entropy with respect to the encoder's weights (sample unit: sequence). Label names
    (strings or integers) become class ids in sorted order of the calibration labels; held-out
    texts of a class the calibration split lacks are dropped (the report says how many).
    """

    name = "probe"
    label = "Classification by linear probe (encoder)"
    description = ("Cross-entropy of a linear head fitted on the dense encoder's embeddings; labelled "
                   "data, default: the help topic of each default passage.")
    auto_model = "AutoModel"
    architectures = ()
    default_calib = "topics"
    higher_is_better = {"loss": False, "accuracy": True, "fidelity": True}
    metric_help = {
        "loss": "mean cross-entropy of the true labels under the fixed probe head on held-out texts",
        "accuracy": "share of held-out texts whose probe prediction is the true label",
        "fidelity": "mean cosine between the compressed and the dense model's embeddings of the same texts "
                    "(1 = unchanged)",
    }

    def __init__(self) -> None:
        self.classes: Optional[list] = None
        self.weight: Optional[Tensor] = None  # (C, d) float32
        self.bias: Optional[Tensor] = None  # (C,)

    def prepare_data(self, calib, evaluation):
        from .data import TextSource

        if calib.labels is None or evaluation.labels is None:
            raise DataError("the probe task needs labelled texts: use the labelled default corpus ('topics'), "
                            "or a .csv/.jsonl/dataset with a label column (label_column=)")
        numeric = all(isinstance(y, int) and not isinstance(y, bool) for y in calib.labels)
        classes = sorted(set(calib.labels), key=None if numeric else str)
        if len(classes) < 2:
            raise DataError(f"the calibration texts carry only one label ({classes[0]!r}); the probe needs 2 classes or more")
        self.classes = classes
        ids = {c: i for i, c in enumerate(classes)}
        keep = [i for i, y in enumerate(evaluation.labels) if y in ids]
        notes = []
        dropped = len(evaluation.labels) - len(keep)
        if dropped:
            notes.append(f"dropped {dropped} held-out texts whose label the calibration texts lack")
        if len(keep) < 2:
            raise DataError("fewer than 2 held-out texts have a label seen in calibration; give more labelled data")
        calib = TextSource(calib.texts, [ids[y] for y in calib.labels],
                           {**calib.description, "classes": [str(c) for c in classes]})
        evaluation = TextSource([evaluation.texts[i] for i in keep], [ids[evaluation.labels[i]] for i in keep],
                                {**evaluation.description, "classes": [str(c) for c in classes],
                                 "dropped_unseen_labels": dropped})
        return calib, evaluation, notes

    def fit(self, model, batches):
        if self.classes is None:
            raise ConfigurationError("call prepare_data before fit: the probe needs the class list")
        feats, labels = [], []
        with _eval_mode(model):
            for b in batches:
                feats.append(pooled_embeddings(model, b).double().cpu())
                labels.append(b["labels"].cpu())
        x, y = torch.cat(feats), torch.cat(labels)
        c, d = len(self.classes), x.shape[1]
        w = torch.zeros(c, d + 1, dtype=torch.float64, requires_grad=True)  # last column: bias
        xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=PROBE_MAX_ITER, tolerance_grad=1e-10, tolerance_change=1e-14,
                                history_size=20, line_search_fn="strong_wolfe")

        def penalised(v: Tensor) -> Tensor:
            return F.cross_entropy(xb @ v.T, y) + 0.5 * PROBE_L2 * v[:, :d].pow(2).sum()

        def objective():
            opt.zero_grad()
            loss = penalised(w)
            loss.backward()
            return loss

        opt.step(objective)
        iterations = int(opt.state[w].get("n_iter", 0))
        grad = torch.autograd.grad(penalised(w), w)[0]
        w = w.detach()
        with torch.no_grad():
            logits = xb @ w.T
            train_loss = float(F.cross_entropy(logits, y))
            train_acc = float((logits.argmax(1) == y).double().mean())
        dev = _device(model)
        self.weight, self.bias = w[:, :d].float().to(dev), w[:, d].float().to(dev)

        return {"kind": "linear probe", "features": "mean-pooled, L2-normalised last hidden state",
                "classes": [str(k) for k in self.classes], "examples": len(y), "l2": PROBE_L2,
                "iterations": iterations, "max_gradient": float(grad.abs().max()),
                "train_loss": train_loss, "train_accuracy": train_acc,
                "sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest()}

    def _head(self, e: Tensor) -> Tensor:
        """The fitted head's logits of embeddings ``e`` (rows, d)."""
        if self.weight is None:
            raise ConfigurationError("the probe head is not fitted; prepare the experiment with pipeline.prepare")
        return e @ self.weight.to(e.device).T + self.bias.to(e.device)

    def _logits(self, model, batch):
        logits = self._head(pooled_embeddings(model, batch))
        return logits, batch["labels"].to(logits.device)

    def reference_outputs(self, model, batches):
        """Embeddings of the evaluation texts, on CPU (fidelity compares with them)."""
        with _eval_mode(model):
            return torch.cat([pooled_embeddings(model, b).cpu() for b in batches])

    def example_values(self, model, batches, reference=None):
        """Per held-out text: the head's cross-entropy, its correctness and (with a reference)
        the cosine of its embedding to the dense model's."""
        if not batches:
            raise DataError("no evaluation batches")
        losses, correct, emb = [], [], []
        with _eval_mode(model):
            for b in batches:
                e = pooled_embeddings(model, b)
                logits = self._head(e)
                labels = b["labels"].to(logits.device)
                losses.append(F.cross_entropy(logits, labels, reduction="none").cpu())
                correct.append((logits.argmax(-1) == labels).float().cpu())
                emb.append(e.cpu())
        out = {"loss": torch.cat(losses), "accuracy": torch.cat(correct)}
        if reference is not None:
            e = torch.cat(emb)
            if reference.shape != e.shape:
                raise ValueError("the reference embeddings come from other batches; compute them on the same batches")
            out["fidelity"] = (e * reference).sum(-1)
        return out


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Task]] = {cls.name: cls for cls in (RetrievalTask, CausalLMTask, ClassificationTask, ProbeTask,
                                                            PackedCausalLMTask)}
TASKS = tuple(_REGISTRY)


def available_tasks() -> list[str]:
    """Names of the registered tasks, in display order (read by the loader, the CLI and the app)."""
    return list(_REGISTRY)


def task_class(name: str) -> type[Task]:
    """The registered class of a task name."""
    if isinstance(name, Task):
        return type(name)
    if name not in _REGISTRY:
        raise ConfigurationError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return _REGISTRY[name]


def get_task(name: str) -> Task:
    """A task instance by name (``TASKS``)."""
    if isinstance(name, Task):
        return name
    return task_class(name)()


def make_batches(tokenizer, texts: Sequence[str], labels: Optional[Sequence] = None, max_length: int = 128,
                 batch_size: int = 8, task: str = "retrieval") -> list[dict[str, Tensor]]:
    """Module-level shortcut for ``get_task(task).make_batches(...)``."""
    return get_task(task).make_batches(tokenizer, texts, labels, max_length, batch_size)
