"""Standard LLM benchmarks on a loaded (possibly compressed) model through lm-evaluation-harness.

lm-evaluation-harness (``pip install "gfwsvd[lm-eval]"``) is used as a library: the model object
in memory, with its :class:`~gfwsvd_core.factorized.LowRankLinear` layers, is wrapped in
``lm_eval.models.huggingface.HFLM`` and run by ``lm_eval.simple_evaluate``, so any installed
task or local YAML task config (``include_path``) works without exporting the model first.
The harness is optional: this module imports without it and says how to install it when used.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import ConfigurationError, DataError

INSTALL_HINT = 'pip install "gfwsvd[lm-eval]"'

#: the harness' loggers, quietened to errors during a run: their INFO and warnings (such as
#: "pretrained is not a str") are about lm_eval's own command-line use
_NOISY_LOGGERS = ("lm_eval",)


def _lm_eval():
    """The harness' modules, or a user error naming the extra to install."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise ConfigurationError(
            f"lm-evaluation-harness is not installed ({missing} is missing); install it with: {INSTALL_HINT}"
        ) from None
    return lm_eval, HFLM, TaskManager


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness (with its Hugging Face backend) can be imported."""
    try:
        _lm_eval()
    except ConfigurationError:
        return False
    return True


def parse_tasks(tasks: Union[str, Sequence[str]]) -> list[str]:
    """Task names from a comma-separated string or a list, stripped, empty ones dropped, order kept."""
    items = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    names = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if not names:
        raise ConfigurationError("no lm-eval task given; name one or more, e.g. wikitext or a local YAML task")
    return names


def check_include_path(include_path: Union[None, str, Path]) -> Optional[Path]:
    """The folder of local YAML task configs, which must exist and hold at least one .yaml file."""
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.exists():
        raise ConfigurationError(f"lm-eval include folder {str(include_path)!r} does not exist")
    if not path.is_dir():
        raise ConfigurationError(f"lm-eval include path {str(include_path)!r} is a file; give the folder of YAML task configs")
    if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
        raise ConfigurationError(f"lm-eval include folder {str(include_path)!r} holds no .yaml task config")
    return path


def task_manager(include_path: Union[None, str, Path] = None, tasks: Union[None, str, Sequence[str]] = None):
    """An lm_eval ``TaskManager`` over the installed tasks plus those under ``include_path``.

    Indexing the installed tasks parses thousands of YAML files (tens of seconds on a slow
    machine), so when every one of ``tasks`` is defined under ``include_path`` (or is a YAML
    path) the manager indexes that folder only.
    """
    _, _, TaskManager = _lm_eval()
    path = check_include_path(include_path)
    with _quiet_loggers():
        if path is not None and tasks is not None:
            local = TaskManager(include_path=str(path), include_defaults=False)
            known = set(local.all_tasks)
            if all(n in known or _is_yaml_file(n) for n in parse_tasks(tasks)):
                return local
        return TaskManager(include_path=str(path) if path is not None else None)


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def resolve_tasks(manager, names: Sequence[str]) -> dict[str, str]:
    """``{task: where its config comes from}``; an unknown name is a user error listing close matches.

    A name is a registered task, group or tag (installed or under the include folder) or the
    path of a YAML task config.
    """
    known = list(manager.all_tasks)
    sources: dict[str, str] = {}
    for name in names:
        if name in known:
            sources[name] = _source(manager, name)
        elif _is_yaml_file(name):
            sources[name] = str(Path(name).resolve())
        else:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ConfigurationError(
                f"unknown lm-eval task {name!r}{hint}; list the installed ones with `lm_eval ls tasks` "
                "(lm_eval --tasks list before 0.4.9), or give a folder of local YAML tasks (--lm-eval-include)"
            )
    return sources


def _source(manager, name: str) -> str:
    """The YAML file a registered task comes from (entries are objects in lm_eval 0.4.9+, dicts before)."""
    entry = getattr(manager, "task_index", {}).get(name)
    path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
    if path in (None, -1, "-1"):
        return "lm_eval (generated)"
    path = Path(path)
    try:
        import lm_eval

        return f"lm_eval/{path.resolve().relative_to(Path(lm_eval.__file__).parent.resolve()).as_posix()}"
    except ValueError:  # a local task
        return str(path)


@contextlib.contextmanager
def _task_data(names: Sequence[str]):
    """A task dataset that is not on disk, not reachable offline or not on the Hub is a DataError."""
    try:
        yield
    except _data_errors() as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"the data of lm-eval task(s) {', '.join(names)} cannot be loaded: {text}; offline, "
                        "only cached datasets and local files (dataset_path: json with data_files) work") from None


def check_task_data(manager, tasks: Union[str, Sequence[str]]) -> None:
    """Build the tasks once, which loads their datasets: missing data fails here, before a long run
    (``datasets`` caches what it loaded, so the evaluation's own load is quick)."""
    names = parse_tasks(tasks)
    with _quiet_loggers(), _task_data(names):
        if callable(getattr(manager, "load", None)):  # lm_eval 0.4.9+
            manager.load(names)
        else:
            from lm_eval.tasks import get_task_dict

            get_task_dict(names, manager)


def check_causal_lm(model) -> None:
    """lm-eval's Hugging Face backend scores text with a causal LM; anything else is a user error."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (tuple, list)) else [v])
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or cls not in names:
        raise ConfigurationError(
            f"lm-eval needs a causal language model (a *ForCausalLM / *LMHeadModel), but the model is a {cls}; "
            "run --lm-eval on a decoder such as GPT-2 or LLaMA"
        )


def _prefix_token(model, tokenizer) -> Optional[int]:
    """The token that conditions a document's first token: lm_eval uses the tokenizer's BOS, else EOS;
    a tokenizer with neither (e.g. a BERT vocabulary on a decoder) falls back to the model config's."""
    if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None:
        return None
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            return value
    cls = getattr(tokenizer, "cls_token_id", None)
    if cls is not None:
        return cls
    raise ConfigurationError("the tokenizer has no BOS or EOS token and the model config none either, so lm-eval "
                             "cannot condition the first token; set tokenizer.bos_token")


def _data_errors() -> tuple[type[BaseException], ...]:
    """What ``datasets`` raises for a task dataset it cannot find or reach."""
    errors: list[type[BaseException]] = [ConnectionError, FileNotFoundError]
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:  # pragma: no cover - older datasets
        pass
    return tuple(errors)


@contextlib.contextmanager
def _quiet_loggers():
    saved = {n: logging.getLogger(n).level for n in _NOISY_LOGGERS}
    for n in _NOISY_LOGGERS:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _number(x: Any) -> Any:
    """A JSON-ready metric value: floats (NaN/inf as None), ints, strings; anything else None."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _metrics(entry: dict) -> tuple[dict, dict]:
    """``({metric: value}, {metric: stderr or None})`` from one lm_eval result entry.

    lm_eval keys are ``"metric,filter"``; the default filter ``none`` is dropped from the name.
    """
    metrics, stderr = {}, {}
    for key, value in entry.items():
        if "," not in key:
            continue  # alias, name, sample_len, ...
        metric, filt = key.split(",", 1)
        is_stderr = metric.endswith("_stderr")
        base = metric[: -len("_stderr")] if is_stderr else metric
        name = base if filt == "none" else f"{base},{filt}"
        v = _number(value)
        if is_stderr:
            stderr[name] = v if not isinstance(v, str) else None  # "N/A" when lm_eval has none
        elif not isinstance(v, str):
            metrics[name] = v
    return metrics, {k: stderr.get(k) for k in metrics}


def compact_results(raw: dict, sources: dict[str, str], limit=None) -> dict:
    """The JSON-ready part of a ``simple_evaluate`` result: per task (and group) its metrics,
    stderr, examples and few-shot count, plus the harness version, the limit and config sources."""
    import lm_eval

    n_samples = raw.get("n-samples") or {}
    n_shot = raw.get("n-shot") or {}
    hib = raw.get("higher_is_better") or {}
    groups = set(raw.get("groups") or {})
    tasks = {}
    for name, entry in {**(raw.get("results") or {}), **(raw.get("groups") or {})}.items():
        metrics, stderr = _metrics(entry)
        rec = {"metrics": metrics, "stderr": stderr}
        if name in groups:
            rec["group"] = True
        count = n_samples.get(name) or {}
        if isinstance(count, dict) and count:
            rec["examples"] = _number(count.get("effective", count.get("original")))
        if name in n_shot:
            rec["num_fewshot"] = _number(n_shot[name])
        better = {k: bool(v) for k, v in (hib.get(name) or {}).items() if isinstance(v, bool)}
        if better:
            rec["higher_is_better"] = better
        tasks[name] = rec
    return {
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
        "tasks": tasks,
        "sources": dict(sources),
    }


def run_lm_eval(model, tokenizer, tasks: Union[str, Sequence[str]], include_path: Union[None, str, Path] = None,
                limit: Optional[Union[int, float]] = None, batch_size: Union[int, str] = 8,
                device: Union[None, str, Any] = None, num_fewshot: Optional[int] = None,
                max_length: Optional[int] = None, bootstrap_iters: int = 1000, quiet: bool = False,
                manager=None) -> dict:
    """Run lm-evaluation-harness tasks on an already loaded causal LM; a compact JSON-ready dict.

    Args:
        model: a ``transformers`` causal LM in memory, dense or compressed (LowRankLinear layers).
        tokenizer: its tokenizer (lm_eval tokenizes the documents with it).
        tasks: comma-separated names or a list: installed tasks, groups or tags, tasks defined
            under ``include_path``, or paths of YAML task configs.
        include_path: a folder of local YAML task configs (searched with the installed tasks).
        limit: examples per task (an int, or a fraction below 1); None runs them all.
        batch_size: an int or lm_eval's ``"auto"``.
        device: moves the model there first; None evaluates it where it is.
        num_fewshot: overrides the tasks' few-shot count.
        max_length: the context window; None takes the model config's (e.g. ``n_positions``).
        bootstrap_iters: bootstrap resamples for the stderr of non-mean metrics (lm_eval's own
            default is 100000; 0 skips them).
        quiet: hide lm_eval's progress bars (they go to stderr).
        manager: a ``TaskManager`` to reuse (building one indexes every installed task, ~seconds).

    Returns ``{"lm_eval_version", "limit", "tasks": {name: {"metrics", "stderr", "examples",
    "num_fewshot", "higher_is_better"}}, "sources": {requested task: config file}}``.
    """
    names = parse_tasks(tasks)
    if limit is not None and not (limit > 0):
        raise ConfigurationError(f"lm-eval limit must be positive, got {limit}")
    check_causal_lm(model)
    lm_eval, HFLM, _ = _lm_eval()
    manager = manager if manager is not None else task_manager(include_path, names)
    sources = resolve_tasks(manager, names)
    if device is not None:
        model.to(device)
    was_training = model.training
    extra = {}
    prefix = _prefix_token(model, tokenizer)
    if prefix is not None:
        extra["prefix_token_id"] = prefix
    if max_length is not None:
        extra["max_length"] = int(max_length)
    sink = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with _quiet_loggers(), sink, _task_data(names):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **extra)
            raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters)
    finally:
        model.train(was_training)
    if raw is None:  # only on non-zero ranks of a distributed run
        return {}
    return compact_results(raw, sources, limit)


def _fmt(value: Any, err: Any = None) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a"
    text = f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.4f}"
    return text + (f" ± {err:.2g}" if isinstance(err, (int, float)) and not isinstance(err, bool) else "")


def comparison_table(dense: dict, compressed: dict) -> str:
    """A plain-text table of each task metric, dense next to compressed (stderr after ±)."""
    rows = [("task", "metric", "dense", "compressed")]
    for task, rec in (compressed.get("tasks") or {}).items():
        base = (dense.get("tasks") or {}).get(task, {"metrics": {}, "stderr": {}})
        for metric, value in rec["metrics"].items():
            rows.append((task, metric, _fmt(base["metrics"].get(metric), base["stderr"].get(metric)),
                         _fmt(value, rec["stderr"].get(metric))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    head = f"lm-eval {compressed.get('lm_eval_version', '')}" + (
        f", at most {compressed['limit']} examples per task" if compressed.get("limit") is not None else "")
    lines = [head] + ["  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in rows]
    return "\n".join(lines)


__all__ = ["INSTALL_HINT", "check_causal_lm", "check_include_path", "check_task_data", "comparison_table",
           "compact_results", "lm_eval_available", "parse_tasks", "resolve_tasks", "run_lm_eval", "task_manager"]
