"""In-sample (calibration) vs held-out loss after compression, per method: is a method overfitting
the calibration Fisher? Sums per-layer predicted and exact-quadratic losses, measures the full
compressed model's loss on the calibration batches and the held-out metrics.

    python bench/in_sample_vs_held_out.py [--samples 128] [--ratio 0.5] [--sample-unit batch]
"""

import argparse
import json

from gfwsvd_core import pipeline


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--sample-unit", default=None)
    p.add_argument("--methods", default="svd,fwsvd,kfac,gfwsvd")
    a = p.parse_args()
    exp = pipeline.prepare(samples=a.samples, eval_samples=a.eval_samples, sample_unit=a.sample_unit)
    methods = a.methods.split(",")
    pipeline.collect(exp, methods)
    base_calib = exp.task.measured_loss(exp.model, exp.calib_batches)
    for m in methods:
        comp, rep = pipeline.run_compression(exp, m, ratio=a.ratio)
        calib = exp.task.measured_loss(comp.model, exp.calib_batches)
        print(json.dumps({
            "method": m, "unit": exp.sample_unit, "K": next(iter(exp.stats.values())).num_samples,
            "sum_own_predicted": sum(r["predicted_loss"] for r in rep["layers"]),
            "sum_exact_quadratic": sum(r["exact_quadratic"] or 0 for r in rep["layers"]),
            "calib_loss_increase": calib - base_calib,
            "held_out_loss_increase": rep["metrics"]["loss"] - rep["baseline_metrics"]["loss"],
            "held_out": {k: round(v, 4) for k, v in rep["metrics"].items()},
        }), flush=True)


if __name__ == "__main__":
    main()
