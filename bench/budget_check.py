"""Predicted vs measured loss increase of a budget allocation on the embedded default (issue 13).

For GFWSVD, K-FAC and SVD at a global kept ratio of 0.4: ranks allocated by the exact empirical-Fisher
quadratic (what the Ranks page does) against uniform ranks; one JSON line per run with the report's
prediction_check, the held-out metrics and which changes are resolved.

    python bench/budget_check.py
"""
import json
from gfwsvd_core import pipeline
from gfwsvd_core.compress import allocation_curves
from gfwsvd_core.ranks import budget_ranks, uniform_ranks
exp = pipeline.prepare(samples=128, eval_samples=256)
pipeline.collect(exp)
for method in ("gfwsvd", "kfac", "svd"):
    decs = pipeline.decompositions(exp, method)
    curves, yard = allocation_curves(decs)
    shapes = {n: d.shape for n, d in decs.items()}
    for rule, ranks in (("budget", budget_ranks(curves, shapes, 0.4)), ("uniform", uniform_ranks(shapes, 0.4))):
        _, rep = pipeline.run_compression(exp, method, ranks=ranks)
        c = rep["prediction_check"]
        print(json.dumps({"method": method, "rule": rule, "yardstick": yard, "kept": round(rep["kept_ratio"]["layers"], 3),
                          "predicted": c["predicted_increase"], "measured": c["measured_increase"],
                          "ratio": c["measured_over_predicted"], "agrees": c["agrees"],
                          "metrics": {k: round(v, 4) for k, v in rep["metrics"].items()},
                          "resolved_change": rep["intervals"]["resolved"]}), flush=True)
