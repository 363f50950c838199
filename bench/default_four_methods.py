"""Issue-3 demonstration: the embedded default, all 36 encoder linears, kept ratio 0.5, methods
svd, fwsvd, kfac and gfwsvd from ONE statistics pass; metrics, per-stage wall time, peak memory.

    python bench/default_four_methods.py [--samples 128] [--eval-samples 256] [--ratio 0.5]
"""

import argparse
import json
import time

from gfwsvd_core import pipeline


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.5)
    a = p.parse_args()
    t0 = time.perf_counter()
    exp = pipeline.prepare(samples=a.samples, eval_samples=a.eval_samples)
    methods = ["svd", "fwsvd", "kfac", "gfwsvd"]
    pipeline.collect(exp, methods)
    print(json.dumps({"baseline": exp.baseline_metrics(), "layers": len(exp.layers),
                      "sample_unit": exp.sample_unit, "K": next(iter(exp.stats.values())).num_samples}), flush=True)
    for m in methods:
        _, rep = pipeline.run_compression(exp, m, ratio=a.ratio)
        print(json.dumps({"method": m, "metrics": rep["metrics"], "kept_ratio": rep["kept_ratio"]}), flush=True)
    print(json.dumps({"timings_s": {k: round(v, 1) for k, v in exp.timings.items()},
                      "total_s": round(time.perf_counter() - t0, 1), "peak_memory_mb": pipeline.peak_memory_mb()}),
          flush=True)


if __name__ == "__main__":
    main()
