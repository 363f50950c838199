"""Why GFWSVD wins or loses against K-FAC, measured (the evidence issue, item 4).

For each task (retrieval, the labelled probe), sample unit and calibration size, on a fixed subset
of layers (two blocks' attention and FFN matrices, so the runs fit this machine): the number of
Fisher samples K, the median effective rank (participation ratio) of GFWSVD's and K-FAC's factors,
GFWSVD's median eta, and at 0.5 kept per layer the summed exact empirical-Fisher quadratic against
the summed measured calibration-loss change of the layers compressed one at a time, and the
held-out metrics of compressing all the subset's layers. One JSON line per configuration.

    python bench/why_gfwsvd.py [--layers layer.1. layer.4.] [--quick] [--only 2,3]
"""
import argparse
import json
import statistics as st
import time

from gfwsvd_core import pipeline
from gfwsvd_core.explore import effective_ranks

CONFIGS = [  # task, sample unit, calibration texts
    ("retrieval", "batch", 128), ("retrieval", "batch", 512), ("retrieval", "token", 128),
    ("probe", "sequence", 128), ("probe", "sequence", 512), ("probe", "batch", 128), ("probe", "token", 128),
]

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--layers", nargs="+", default=["layer.1.", "layer.4."])
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="the first configuration of each task only")
    p.add_argument("--only", type=lambda s: [int(x) for x in s.split(",")], help="indices into CONFIGS, e.g. 2,3")
    a = p.parse_args()
    configs = [c for i, c in enumerate(CONFIGS) if (not a.quick or i in (0, 3)) and (a.only is None or i in a.only)]
    for task, unit, n in configs:
        t0 = time.perf_counter()
        exp = pipeline.prepare(task=task, sample_unit=unit, samples=n, eval_samples=a.eval_samples, layers=a.layers)
        pipeline.collect(exp, ("kfac", "gfwsvd"), extra_kinds=("samples",))
        decs = {m: pipeline.decompositions(exp, m) for m in ("gfwsvd", "kfac")}
        eff = effective_ranks(decs["gfwsvd"], exp.stats)
        row = {"task": task, "unit": unit, "texts": n, "layers": len(exp.layers),
               "K": exp.stats[exp.layers[0]].num_samples}
        for key in ("gfwsvd_in", "gfwsvd_out", "kfac_in", "kfac_out"):
            row[f"eff_rank_{key}"] = round(st.median(r[key] for r in eff), 1)
        row["gfwsvd_eta"] = round(st.median(r["eta"] for r in eff), 3)
        for m in ("gfwsvd", "kfac"):
            _, rep = pipeline.run_compression(exp, m, ratio=0.5, measure=True)
            row[f"{m}_exact_quadratic"] = sum(r["exact_quadratic"] for r in rep["layers"])
            row[f"{m}_measured_sum"] = sum(r["measured_increase"] for r in rep["layers"])
            row[f"{m}_measured_joint"] = rep["prediction_check"]["measured_increase"]
            row[f"{m}_metrics"] = {k: round(v, 4) for k, v in rep["metrics"].items()}
        row["dense_metrics"] = {k: round(v, 4) for k, v in rep["baseline_metrics"].items()}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
