"""Why does GFWSVD win or lose against K-FAC on the embedded default? Vary one thing at a time.

    python bench/gfwsvd_vs_kfac.py [--ratio 0.5] [--eval-samples 256]

Prints one JSON line per variant: held-out metrics of K-FAC and GFWSVD at the same kept ratio,
plus the mean captured energy eta of the Kronecker fits.
"""

import argparse
import json
import time

from gfwsvd_core import pipeline
from gfwsvd_core.methods import get_method


def run(name, ratio, eval_samples, methods=("kfac", "gfwsvd"), gf=None, **opts):
    t0 = time.perf_counter()
    exp = pipeline.prepare(eval_samples=eval_samples, **opts)
    pipeline.collect(exp, ["kfac", "gfwsvd", "fwsvd"])
    out = {"variant": name, "samples_K": next(iter(exp.stats.values())).num_samples, "unit": exp.sample_unit}
    for m in methods:
        method = get_method(m, **(gf or {})) if m == "gfwsvd" else m
        exp.decompositions.pop("gfwsvd", None)
        _, rep = pipeline.run_compression(exp, method, ratio=ratio)
        out[m] = {k: round(v, 4) for k, v in rep["metrics"].items()}
        if m == "gfwsvd":
            etas = [r["kronecker"]["eta"] for r in rep["layers"] if r.get("kronecker")]
            out["mean_eta"] = round(sum(etas) / len(etas), 4)
    out["baseline"] = {k: round(v, 4) for k, v in exp.baseline_metrics().items()}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--only", nargs="*")
    a = p.parse_args()
    variants = {
        "default (batch unit, K=16)": dict(samples=128),
        "token unit": dict(samples=128, sample_unit="token"),
        "more samples (512 texts, K=64)": dict(samples=512),
        "smaller batches (bs=2, K=64)": dict(samples=128, batch_size=2),
        "damping 1e-2": dict(samples=128, gf={"damping": 1e-2}, methods=("gfwsvd",)),
        "init identity": dict(samples=128, gf={"init": "identity"}, methods=("gfwsvd",)),
        "mc fisher": dict(samples=128, fisher="mc"),
    }
    for name, opts in variants.items():
        if a.only and not any(o in name for o in a.only):
            continue
        run(name, a.ratio, a.eval_samples, **opts)


if __name__ == "__main__":
    main()
