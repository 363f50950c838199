"""A study: methods x kept ratios x seeds from one command, as JSON and a Markdown table.

Each seed re-draws the calibration and held-out texts (``split_texts``) and runs one statistics
pass and one sweep (:func:`gfwsvd_core.pipeline.run_sweep`). A cell reports the mean over seeds
and the spread (min .. max over seeds); within a seed every cell also has its bootstrap interval
over the held-out examples. A column's winner is marked only where it is resolved: the same
method is best in every seed and, in every seed, the paired bootstrap separates it from all
other methods. Nothing here is tuned toward a method: ratios, metrics and seeds are the caller's.
"""

from __future__ import annotations

import statistics as st
from typing import Any, Callable, Optional, Sequence

from .methods import method_key


def run_study(methods: Sequence[str], ratios: Sequence[float], seeds: Sequence[int], options: dict,
              progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the grid; ``options`` are :func:`gfwsvd_core.pipeline.prepare` settings (without seed)."""
    from . import pipeline

    methods = [method_key(m) for m in methods]  # validate before the long work
    if not seeds:
        raise ValueError("a study needs at least one seed")
    runs = []
    for seed in seeds:
        if progress:
            progress(f"seed {seed}: statistics")
        exp = pipeline.prepare(**{**options, "seed": int(seed)})
        pipeline.collect(exp, methods)
        if progress:
            progress(f"seed {seed}: sweep")
        rep = pipeline.run_sweep(exp, methods, ratios)
        runs.append({"seed": int(seed), "task": exp.bundle.task, "calibration": exp.data_record(),
                     "rows": rep["rows"], "warnings": rep.get("warnings", [])})
    return {"methods": methods, "ratios": list(ratios), "seeds": [int(s) for s in seeds],
            "options": {k: v for k, v in options.items() if k != "seed"}, "runs": runs,
            "table": summarise(runs, methods, ratios)}


def summarise(runs: Sequence[dict], methods: Sequence[str], ratios: Sequence[float]) -> dict:
    """``{metric: {"dense": cell, ratio: {method: cell}, "winner": {ratio: method or None}}}``
    where a cell is ``{"mean", "min", "max", "seeds"}`` over the seeds."""
    metrics = list(runs[0]["rows"][0]["metrics"])
    out: dict[str, Any] = {}
    for metric in metrics:
        def cell(values: list[float]) -> dict:
            return {"mean": st.fmean(values), "min": min(values), "max": max(values), "seeds": len(values)}

        table: dict[str, Any] = {"dense": cell([r["rows"][0]["metrics"][metric] for r in runs]), "by_ratio": {},
                                 "winner": {}}
        for ratio in ratios:
            row: dict[str, dict] = {}
            for m in methods:
                vals = [x["metrics"][metric] for r in runs for x in r["rows"]
                        if x["method"] == m and abs(x["ratio"] - ratio) < 1e-12]
                if vals:
                    row[m] = cell(vals)
            table["by_ratio"][str(ratio)] = row
            verdicts = [next((x["comparison"][metric] for x in r["rows"]
                              if x.get("comparison") and abs(x["ratio"] - ratio) < 1e-12), None) for r in runs]
            same = verdicts[0]["best"] if verdicts and verdicts[0] else None
            resolved = same is not None and all(v and v["best"] == same and v["all_resolved"] for v in verdicts)
            table["winner"][str(ratio)] = same if resolved else None
        out[metric] = table
    return out


def markdown(study: dict, higher_is_better: Optional[dict] = None) -> str:
    """The study's tables, one per metric: rows = methods, columns = kept ratios."""
    hib = higher_is_better or {}
    lines = [f"Methods x kept ratios over seeds {study['seeds']} (each seed re-draws the calibration and held-out "
             "texts). Cells: mean over seeds (min .. max). **Bold**: the column's winner, marked only where the same "
             "method wins in every seed and a paired bootstrap over the held-out examples separates it from every "
             "other method in every seed.", ""]
    for metric, table in study["table"].items():
        arrow = "higher is better" if hib.get(metric) else "lower is better"
        d = table["dense"]
        lines += [f"**{metric}** ({arrow}; dense {d['mean']:.4f})", "",
                  "| method | " + " | ".join(f"kept {r}" for r in study["ratios"]) + " |",
                  "|---|" + "---|" * len(study["ratios"])]
        for m in study["methods"]:
            cells = []
            for r in study["ratios"]:
                c = table["by_ratio"][str(r)].get(m)
                txt = "" if c is None else f"{c['mean']:.4f} ({c['min']:.4f} .. {c['max']:.4f})"
                cells.append(f"**{txt}**" if c is not None and table["winner"][str(r)] == m else txt)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        unresolved = [str(r) for r in study["ratios"] if table["winner"][str(r)] is None]
        if unresolved:
            lines.append("")
            lines.append(f"No resolved winner at kept {', '.join(unresolved)}.")
        lines.append("")
    return "\n".join(lines)
