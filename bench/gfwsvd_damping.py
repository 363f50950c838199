"""GFWSVD at several relative dampings from ONE Kronecker fit (damping only enters the solver).

    python bench/gfwsvd_damping.py [--samples 128] [--ratio 0.5]
"""

import argparse
import json

from gfwsvd_core import pipeline
from gfwsvd_core.compress import LayerDecomposition, build_compressed
from gfwsvd_core.layers import get_weight
from gfwsvd_core.ranks import uniform_ranks
from gfwsvd_core.solver import decompose


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--dampings", default="1e-6,1e-3,1e-2,1e-1,1")
    a = p.parse_args()
    exp = pipeline.prepare(samples=a.samples, eval_samples=a.eval_samples)
    pipeline.collect(exp, ["gfwsvd", "kfac"])
    base = pipeline.decompositions(exp, "gfwsvd")
    ranks = uniform_ranks({n: d.shape for n, d in base.items()}, a.ratio)
    for lam in [float(x) for x in a.dampings.split(",")]:
        decs = {}
        for n, d in base.items():
            w = d.weights
            dec = decompose(get_weight(exp.model.get_submodule(n)), w.left, w.right, damping=lam)
            decs[n] = LayerDecomposition(n, d.shape, "gfwsvd", dec, {}, 0.0, w)
        model = build_compressed(exp.model, decs, ranks)
        metrics = exp.task.evaluate(model, exp.eval_batches, exp.reference())
        exact = sum(exp.stats[n].quadratic(get_weight(exp.model.get_submodule(n)).double() - decs[n].decomposition.reconstruct(r))
                    for n, r in ranks.items() if r)
        pred = sum(float(decs[n].predicted_loss[r]) for n, r in ranks.items() if r)
        print(json.dumps({"damping": lam, "held_out": {k: round(v, 4) for k, v in metrics.items()},
                          "sum_predicted": pred, "sum_exact_quadratic": exact}), flush=True)
    print(json.dumps({"baseline": exp.baseline_metrics()}), flush=True)


if __name__ == "__main__":
    main()
