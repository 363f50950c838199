"""Headless entry point: ``gfwsvd compress | evaluate | sweep`` (also ``python -m gfwsvd_core``).

User errors (bad model id, unknown method, ratio outside (0, 1], unreadable data, bad ranks
file, tampered export: every :class:`~gfwsvd_core.errors.GfwsvdUserError`) print one line
``error: ...`` and exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import GfwsvdUserError
from .methods import split_methods

EXIT_USAGE = 2


class UserError(GfwsvdUserError):
    """A CLI-level user error (bad flag combination, unreadable ranks file); printed, exit 2."""


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1] (parameters kept / original), got {value}")
    return value


def _ratios(text: str) -> list[float]:
    values = [_ratio(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios in (0, 1], got {text!r}")
    return values


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for, but CUDA is not available here; use cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common(p: argparse.ArgumentParser, single_method: bool = True) -> None:
    from .methods import explorer_methods, method_help
    from .tasks import available_tasks

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="default", help="'default' (bundled all-MiniLM-L6-v2), an HF id or a local folder")
    g.add_argument("--task", choices=available_tasks(), help="default: from the model config")
    g.add_argument("--calib", default="default",
                   help="'default' (pydoc topics; labelled by topic for --task probe), 'topics' (the same, "
                   "labelled), an HF dataset name[:config], or a .txt/.jsonl/.csv file")
    g.add_argument("--text-column", help="text column of a .jsonl/.csv file or HF dataset")
    g.add_argument("--label-column", help="label column of a .jsonl/.csv file or HF dataset (classification and "
                   "probe tasks); by default 'label' when there is one")
    g.add_argument("--split", default="train", help="HF dataset split")
    g.add_argument("--samples", type=_positive, default=128, help="calibration texts (default 128)")
    g.add_argument("--eval-samples", type=_positive, default=256, help="held-out evaluation texts (default 256)")
    g.add_argument("--max-length", type=_positive, default=128, help="tokens per text (default 128)")
    g.add_argument("--batch-size", type=_positive, default=8)
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--max-memory", type=_memory, help="memory budget, e.g. 8GiB or 500MB: planned before any work "
                   "(see 'gfwsvd plan'); layers are then collected in groups, decompositions kept lean and, when "
                        "keeping every layer's statistics does not fit, each group's statistics freed after its "
                        "decompositions (streamed) as needed")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model dtype (default float32); statistics and factors are computed in float32/float64 "
                        "and the compressed weights cast back to this dtype")
    f = p.add_argument_group("Fisher statistics")
    f.add_argument("--fisher", choices=["empirical", "mc"], default="empirical",
                   help="data labels (empirical) or targets sampled from the model (mc)")
    f.add_argument("--sample-unit", choices=["token", "sequence", "batch"], help="default: the task's")
    f.add_argument("--layers", nargs="+", help="layer name patterns (glob, substring or re:REGEX); default: all block linears")
    c = p.add_argument_group("compression")
    if single_method:
        c.add_argument("--method", default="gfwsvd", help="a method or spec such as svdllm[root=eigen]; one of: "
                       + method_help())
        c.add_argument("--update", action="store_true",
                       help="after truncation, re-solve each layer's output side by least squares on the calibration "
                            "inputs (closed-form update)")
        c.add_argument("--allocation", choices=["uniform", "budget", "v2"],
                       help="how --ratio becomes ranks: uniform per layer, one global budget on the loss estimate, or "
                            "SVD-LLM V2's per-type ratios (default: the method's own, uniform for most)")
        c.add_argument("--sequential", action="store_true",
                       help="compress block by block, each block's statistics on the already-compressed model "
                            "(one extra statistics pass per block)")
        how = c.add_mutually_exclusive_group()
        how.add_argument("--ratio", type=_ratio, help="parameters kept per layer, in (0, 1] (default 0.5)")
        how.add_argument("--ranks", type=Path, help="JSON file {layer: rank or null}")
    else:
        c.add_argument("--methods", default=",".join(explorer_methods()),
                       help="comma-separated methods or specs, e.g. svd,svd[update=true],svdllm2 (default "
                            "%(default)s); options every method takes: update, allocation (uniform, budget, v2), "
                            "sequential; available: " + method_help())
        c.add_argument("--ratios", type=_ratios, default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.8], help="comma-separated kept ratios")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfwsvd", description="Fisher-weighted low-rank compression of transformer linear layers.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a model and export it")
    _common(c)
    c.add_argument("--out", type=Path, required=True, help="folder for the compressed model")
    c.add_argument("--dense", action="store_true", help="also export a dense copy (factors multiplied back) to OUT-dense")
    e = sub.add_parser("evaluate", help="compress in memory and report per-layer predicted / exact / measured loss")
    _common(e)
    e.add_argument("--measure", action="store_true", help="measure each layer's loss increase alone (one evaluation per layer)")
    e.add_argument("--compressed", type=Path, help="evaluate this exported folder instead of compressing (against --model)")
    e.add_argument("--out", type=Path, help="also export the compressed model here")
    h = e.add_argument_group("lm-evaluation-harness (pip install \"gfwsvd[lm-eval]\")")
    h.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval tasks (installed, or local YAML under "
                   "--lm-eval-include) run on the dense and the compressed causal LM; results under 'lm_eval' in the report")
    h.add_argument("--lm-eval-include", metavar="DIR", type=Path, help="a folder of local YAML task configs")
    h.add_argument("--lm-eval-limit", metavar="N", type=_positive, help="at most N examples per task")
    s = sub.add_parser("sweep", help="metrics over kept ratios for several methods (rank/accuracy curves)")
    _common(s, single_method=False)
    s.add_argument("--out", type=Path, help="folder for the sweep report (sweep.json)")
    y = sub.add_parser("study", help="methods x kept ratios x seeds: a JSON and a Markdown table with spreads and resolved winners")
    _common(y, single_method=False)
    y.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each re-draws calibration and held-out texts")
    y.add_argument("--out", type=Path, required=True, help="folder for study.json and study.md")
    _plan_parser(sub)
    return p


def _memory(text: str) -> int:
    from .plan import parse_bytes

    try:
        return parse_bytes(text)
    except GfwsvdUserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _plan_parser(sub) -> None:
    q = sub.add_parser("plan", help="predict peak memory and time per stage, and the storage and passes that fit a budget")
    q.add_argument("--model", default="default", help="an HF id or a local folder (only its config is read)")
    q.add_argument("--task", help="default: from the model config")
    q.add_argument("--samples", type=_positive, default=128, help="calibration sequences (default 128)")
    q.add_argument("--max-length", type=_positive, default=128, help="tokens per sequence (default 128)")
    q.add_argument("--batch-size", type=_positive, default=8)
    q.add_argument("--device", default="cpu", help="cpu or cuda: where statistics and factors are computed")
    q.add_argument("--max-memory", type=_memory, help="memory budget, e.g. 8GiB or 500MB")
    q.add_argument("--methods", default="gfwsvd", help="comma-separated methods (default gfwsvd)")
    q.add_argument("--sample-unit", choices=["token", "sequence", "batch"], help="default: the task's")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--ratio", type=_ratio, default=0.5, help="kept ratio, for the compressed model's size")
    q.add_argument("--report", type=Path, help="write the plan as JSON here")


def cmd_plan(a) -> int:
    """Print the memory/time plan (and write it as JSON); a budget that cannot be met is an error."""
    import torch

    from . import pipeline
    from .plan import make_plan

    methods = split_methods(a.methods)
    if not methods:
        raise UserError("--methods names no method; give e.g. gfwsvd or svd,kfac")
    p = make_plan(a.model, a.samples, a.max_length, a.device, a.max_memory, methods, a.sample_unit,
                  getattr(torch, a.dtype), a.batch_size, task=a.task, ratio=a.ratio)
    print(p.table())
    if a.report:
        pipeline.write_json(p.as_dict(), a.report)
    p.check()
    return 0


def _collect(exp, a, methods, prog, extra_kinds=()) -> None:
    """Collect the statistics; with --max-memory, plan on the loaded experiment first, fail early
    when it cannot fit, collect in the planned groups (streamed when keeping every layer's
    statistics would not fit) and keep decompositions lean when the plan says so."""
    from . import pipeline

    if getattr(a, "max_memory", None) is None:
        pipeline.collect(exp, methods=methods, extra_kinds=extra_kinds, progress=prog)
        return
    from .plan import plan_experiment

    p = plan_experiment(exp, a.max_memory, methods, extra_kinds)
    if p.stream:
        if not getattr(a, "quiet", False) and _lead():
            print(f"--max-memory {a.max_memory}: statistics streamed in {len(p.groups)} group(s) of layers "
                  "(each collected, decomposed and freed before the next pass)", file=sys.stderr)
        pipeline.collect_streamed(exp, methods, p.groups, progress=prog, extra_kinds=extra_kinds)
    else:
        pipeline.collect(exp, methods=methods, extra_kinds=extra_kinds, progress=prog,
                         max_memory=p.collect_max_memory)


def _progress(quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    state = {"bar": None, "desc": None}

    def update(done, total, msg):
        stage = msg.split(":")[0]
        if state["bar"] is None or state["desc"] != stage:
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False)
            state["desc"] = stage
        state["bar"].n = done
        state["bar"].refresh()
        if total is not None and done >= total:
            state["bar"].close()
            state["bar"] = None

    return update


def _load_ranks(path: Path) -> dict:
    try:
        ranks = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"ranks file {path} does not exist") from None
    except OSError as exc:
        raise UserError(f"ranks file {path} cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"ranks file {path} is not valid JSON: expected {{\"layer name\": rank or null}}") from None
    if not isinstance(ranks, dict) or not ranks:
        raise UserError(f"ranks file {path} must hold a non-empty JSON object {{\"layer name\": rank or null}}")
    return ranks


def _check_outputs(a) -> None:
    """Fail before any long work when an output path cannot be written."""
    out = getattr(a, "out", None)
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is an existing file; give a folder")
    if out is not None and a.command not in ("sweep", "study") and out.is_dir() and any(out.iterdir()) and not a.overwrite:
        raise UserError(f"--out {str(out)!r} is not empty; give a new folder or pass --overwrite to replace it")
    dense = Path(str(out) + "-dense") if out is not None and getattr(a, "dense", False) else None
    if dense is not None and dense.is_dir() and any(dense.iterdir()) and not a.overwrite:
        raise UserError(f"the dense copy's folder {str(dense)!r} is not empty; pass --overwrite to replace it")
    report = getattr(a, "report", None)
    if report is not None and report.is_dir():
        raise UserError(f"--report {str(report)!r} is a folder; give a file name such as report.json")


def _check_ranks_layers(exp, ranks: dict) -> None:
    """Fail before the statistics pass when the ranks file names layers that will not be compressed."""
    from .layers import weight_shape
    from .ranks import validate_ranks

    shapes = {n: weight_shape(exp.model.get_submodule(n)) for n in exp.layers}
    validate_ranks(shapes, ranks)


def _silence_transformers() -> None:
    """transformers' own loading bars and load reports would drown the CLI's output."""
    try:
        from transformers.utils import logging as tlogging
    except ImportError:  # pragma: no cover
        return
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()


def _method_spec(a) -> str:
    """The method spec of --method with --update / --allocation / --sequential applied."""
    from .methods import get_method, method_key

    opts = {k: v for k, v in (("update", a.update or None), ("allocation", a.allocation),
                              ("sequential", a.sequential or None)) if v is not None}
    return method_key(get_method(a.method, **opts))


def _options(a) -> dict:
    return {
        "model": a.model, "task": a.task, "calib": a.calib, "text_column": a.text_column,
        "label_column": a.label_column, "split": a.split,
        "samples": a.samples, "eval_samples": a.eval_samples, "max_length": a.max_length,
        "batch_size": a.batch_size, "seed": a.seed, "fisher": a.fisher, "sample_unit": a.sample_unit,
        "layers": a.layers, "device": a.device, "dtype": a.dtype,
    }


def _print_metrics(rep: dict) -> None:
    base, new = rep.get("baseline_metrics") or {}, rep.get("metrics") or {}
    print(f"method {rep['method']}: kept {rep['kept_ratio']['layers']:.3f} of the compressed layers' "
          f"parameters, {rep['kept_ratio']['model']:.3f} of the model")
    iv = rep.get("intervals") or {}
    if iv:
        print(f"  {iv['level']:.0%} bootstrap intervals over {iv['examples']} held-out examples; "
              "change: paired, 'not resolved' when its interval includes 0")
    for k in new:
        line = f"  {k:>10}: {base.get(k, float('nan')):.4f} -> {new[k]:.4f}"
        if k in iv.get("metrics", {}):
            lo, hi = iv["metrics"][k]
            clo, chi = iv["change"][k]
            line += (f"  [{lo:.4f}, {hi:.4f}]  change {new[k] - base.get(k, float('nan')):+.4f} "
                     f"[{clo:+.4f}, {chi:+.4f}]{'' if iv['resolved'][k] else ' not resolved'}")
        print(line)
    dense = rep.get("dense_layers") or []
    if dense:
        print(f"  {len(dense)} layer(s) kept dense (rank at or above break-even)")
    _print_warnings(rep)


def _print_warnings(rep: dict) -> None:
    """Every fallback and data warning of a report, on stderr, one line each."""
    for w in rep.get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr)


def cmd_compress(a) -> int:
    from . import pipeline
    from .io import export_dense, save_compressed
    from .methods import get_method

    a.method = _method_spec(a)  # validate before the long work
    ranks = _load_ranks(a.ranks) if a.ranks else None
    exp = pipeline.prepare(**_options(a))
    if ranks:
        _check_ranks_layers(exp, ranks)
    prog = _progress(a.quiet)
    _collect(exp, a, [a.method], prog)
    comp, rep = pipeline.run_compression(exp, a.method, ratio=None if ranks else (a.ratio or 0.5), ranks=ranks,
                                         progress=prog)
    rep["export"] = str(a.out)
    if _lead():
        save_compressed(comp.model, a.out, tokenizer=exp.bundle.tokenizer, method=comp.method,
                        source_model=str(a.model), calibration=exp.data_record(), overwrite=a.overwrite)
        if a.dense:
            export_dense(comp.model, Path(str(a.out) + "-dense"), tokenizer=exp.bundle.tokenizer, overwrite=a.overwrite)
        if a.report:
            pipeline.write_json(rep, a.report)
    _print_metrics(rep)
    print(f"saved to {a.out}; load with: from gfwsvd_core.io import load_compressed; model = load_compressed({str(a.out)!r})")
    return 0


def cmd_evaluate(a) -> int:
    from . import pipeline
    from .evaluate import evaluate_pair
    from .io import load_compressed, save_compressed
    from .methods import get_method

    tasks = _lm_eval_tasks(a)  # flags, harness, task names and task data checked before any long work
    if a.compressed:
        model = load_compressed(a.compressed)  # a tampered folder fails here, before any long work
        exp = pipeline.prepare(**_options(a))
        _check_same_model(exp.model, model, a)
        _lm_eval_model(tasks, exp.model)
        model.to(exp.model.device)
        base, metrics = evaluate_pair(exp.task, exp.model, model, exp.eval_batches, exp.reference())
        rep = {"compressed": str(a.compressed), "model": a.model, **_export_summary(a.compressed, exp.model, model),
               "baseline_metrics": base, "metrics": metrics, "calibration": exp.data_record(),
               "timings": dict(exp.timings)}
        _print_metrics(rep)
    else:
        a.method = _method_spec(a)
        ranks = _load_ranks(a.ranks) if a.ranks else None
        exp = pipeline.prepare(**_options(a))
        _lm_eval_model(tasks, exp.model)
        if ranks:
            _check_ranks_layers(exp, ranks)
        prog = _progress(a.quiet)
        # the exact empirical-Fisher quadratic needs per-sample gradients whatever the method:
        # GFWSVD's statistics ("samples" + "kfac") include them
        _collect(exp, a, [a.method], prog, ("samples",))
        comp, rep = pipeline.run_compression(exp, a.method, ratio=None if ranks else (a.ratio or 0.5), ranks=ranks,
                                             measure=a.measure, progress=prog)
        _print_metrics(rep)
        print(f"{'layer':<48} {'rank':>5} {'predicted':>11} {'exact quad':>11}" + (f" {'measured':>11}" if a.measure else ""))
        for r in rep["layers"]:
            line = f"{r['layer']:<48} {str(r['rank']):>5} {r['predicted_loss']:>11.3e} {_fmt(r.get('exact_quadratic'))}"
            if a.measure:
                line += f" {_fmt(r.get('measured_increase'))}"
            print(line)
        if a.out and _lead():
            save_compressed(comp.model, a.out, tokenizer=exp.bundle.tokenizer, method=comp.method,
                            source_model=str(a.model), calibration=exp.data_record(), overwrite=a.overwrite)
        model = comp.model
    if tasks is not None and _lead():  # under torchrun rank 0 runs the harness (it does not split it)
        rep["lm_eval"] = _lm_eval_compare(a, tasks, exp, model)
    if a.report and _lead():
        pipeline.write_json(rep, a.report)
    return 0


def _lm_eval_tasks(a):
    """``(task names, TaskManager)`` for --lm-eval, or None; a missing harness, include folder,
    task or task dataset is a user error here, before the model is loaded."""
    if a.lm_eval is None:
        if a.lm_eval_include is not None or a.lm_eval_limit is not None:
            raise UserError("--lm-eval-include and --lm-eval-limit need --lm-eval TASKS")
        return None
    from . import harness

    names = harness.parse_tasks(a.lm_eval)
    manager = harness.task_manager(a.lm_eval_include, names)
    harness.resolve_tasks(manager, names)
    harness.check_task_data(manager, names)
    return names, manager


def _lm_eval_model(tasks, model) -> None:
    """lm-eval scores text with a causal LM: check the loaded model before the statistics pass."""
    if tasks is not None:
        from .harness import check_causal_lm

        check_causal_lm(model)


def _lm_eval_compare(a, tasks, exp, compressed) -> dict:
    """The --lm-eval tasks on the dense model, then on the compressed one; prints a table."""
    from .harness import comparison_table, run_lm_eval

    names, manager = tasks
    common = dict(tasks=names, include_path=a.lm_eval_include, limit=a.lm_eval_limit, batch_size=a.batch_size,
                  quiet=a.quiet, manager=manager)
    out = {"dense": run_lm_eval(exp.model, exp.bundle.tokenizer, **common),
           "compressed": run_lm_eval(compressed, exp.bundle.tokenizer, **common)}
    print(comparison_table(out["dense"], out["compressed"]))
    return out


def _check_same_model(original, compressed, a) -> None:
    """The exported folder must come from ``--model``: same class and same tensor shapes."""
    from .factorized import LowRankLinear
    from .layers import weight_shape

    try:
        source = json.loads((Path(a.compressed) / "config.json").read_text(encoding="utf-8"))["gfwsvd"]["source_model"]
    except (OSError, ValueError, KeyError, TypeError):
        source = None
    hint = f" (it was made from {source!r})" if isinstance(source, str) and source else ""
    mismatch = type(original) is not type(compressed)
    if not mismatch:
        dense = dict(original.named_modules())
        orig_params = dict(original.named_parameters())
        low = {n: m for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
        for name, m in low.items():
            if name not in dense or weight_shape(dense[name]) != (m.out_features, m.in_features):
                mismatch = True
                break
        for name, p in compressed.named_parameters():
            if any(name.startswith(f"{ln}.") for ln in low):
                continue
            if name not in orig_params or orig_params[name].shape != p.shape:
                mismatch = True
                break
    if mismatch:
        raise UserError(f"the compressed folder {str(a.compressed)!r} does not come from model {a.model!r}{hint}; "
                        "pass the model it was made from with --model")


def _export_summary(folder, original, compressed) -> dict:
    """Method, ranks and kept ratios of a loaded export, in the report's format."""
    from .factorized import LowRankLinear
    from .ranks import kept_params, layer_params

    try:
        block = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("gfwsvd", {})
    except (OSError, ValueError):
        block = {}
    low = {n: m for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
    shapes = {n: (m.out_features, m.in_features) for n, m in low.items()}
    after, before = kept_params(shapes, {n: m.rank for n, m in low.items()})
    total_before = sum(p.numel() for p in original.parameters())
    total_after = sum(p.numel() for p in compressed.parameters())
    layers = [{"layer": n, "shape": list(shapes[n]), "rank": m.rank, "params_before": layer_params(*shapes[n], None),
               "params_after": layer_params(*shapes[n], m.rank)} for n, m in low.items()]
    return {
        "method": block.get("method", ""),
        "kept_ratio": {"layers": after / before if before else 1.0,
                       "model": total_after / total_before if total_before else 1.0},
        "layers": layers,
    }


def _fmt(x) -> str:
    return f"{x:>11.3e}" if isinstance(x, (int, float)) else f"{'n/a':>11}"


def cmd_sweep(a) -> int:
    from . import pipeline
    from .methods import get_method

    methods = split_methods(a.methods)
    if not methods:
        raise UserError("--methods names no method; give e.g. svd,gfwsvd")
    for m in methods:
        get_method(m)  # validate before the long work
    exp = pipeline.prepare(**_options(a))
    prog = _progress(a.quiet)
    _collect(exp, a, methods, prog)
    rep = pipeline.run_sweep(exp, methods, a.ratios, progress=prog)
    _print_warnings(rep)
    keys = list(rep["rows"][0]["metrics"])
    width = max(8, *(len(r["method"]) for r in rep["rows"]))
    print(f"{'method':<{width}} {'ratio':>6} {'kept':>6} " + " ".join(f"{k:>10}" for k in keys))
    for row in rep["rows"]:
        print(f"{row['method']:<{width}} {row['ratio']:>6.2f} {row['kept_layers']:>6.3f} "
              + " ".join(f"{row['metrics'][k]:>10.4f}" for k in keys))
    if a.out and _lead():
        pipeline.write_json(rep, Path(a.out) / "sweep.json")
    if a.report and _lead():
        pipeline.write_json(rep, a.report)
    return 0


def cmd_study(a) -> int:
    from . import pipeline
    from .study import markdown, run_study
    from .tasks import get_task

    methods = split_methods(a.methods)
    if not methods:
        raise UserError("--methods names no method; give e.g. svd,gfwsvd")
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if not seeds:
        raise UserError("--seeds names no seed; give e.g. 0,1,2")
    options = {k: v for k, v in _options(a).items() if k != "seed"}
    study = run_study(methods, a.ratios, seeds, options, progress=None if a.quiet else (lambda m: print(m, file=sys.stderr)))
    out = Path(a.out)
    hib = getattr(get_task(study["runs"][0]["task"]), "higher_is_better", {})
    text = markdown(study, hib)
    if _lead():
        pipeline.write_json(study, out / "study.json")
        (out / "study.md").write_text(text)
    print(text)
    return 0


def _lead() -> bool:
    """Whether this process writes and prints: always, except the ranks > 0 of a torchrun job."""
    from . import distributed

    shard = distributed.current()
    return shard is None or shard.is_main


def _join_job(a) -> None:
    """Under torchrun: join the job (gloo, or NCCL on CUDA), take this rank's device, and keep
    ranks > 0 quiet (rank 0 prints, writes the report and exports)."""
    from . import distributed

    if not distributed.launched() or not hasattr(a, "device"):
        return
    shard = distributed.init(a.device)
    a.device = distributed.local_device(a.device)
    if not shard.is_main:
        a.quiet = True
        sys.stdout = open(os.devnull, "w")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from . import distributed
    from .stats import Cancelled

    _silence_transformers()
    try:
        _check_outputs(a)
        _join_job(a)
        return {"compress": cmd_compress, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
                "study": cmd_study, "plan": cmd_plan}[a.command](a)
    except GfwsvdUserError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Cancelled):
        print("error: cancelled", file=sys.stderr)
        return 130
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
