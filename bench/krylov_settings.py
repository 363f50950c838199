"""GFWSVD solver settings on real layers of the embedded default: time, steps and accuracy.

For a few layers, the Krylov solve at several tolerances, with and without the float64
refinement, against a float64 reference solved to 1e-10. Accuracy is the relative Frobenius
difference of the Kronecker products ``A (x) B`` (computed from the factors, never formed).

    python bench/krylov_settings.py [--samples 128] [--layers 0.attention.self.query,0.intermediate.dense,0.output.dense]
"""

import argparse
import json
import math
import time

import torch

from gfwsvd_core import pipeline
from gfwsvd_core.fisher.kronecker import nearest_kronecker


def kron_rel_diff(A, B, A2, B2) -> float:
    A, B, A2, B2 = (t.double() for t in (A, B, A2, B2))
    nn = lambda X, Y: float((X * Y).sum())  # noqa: E731
    ref = nn(A, A) * nn(B, B)
    d2 = ref + nn(A2, A2) * nn(B2, B2) - 2 * nn(A, A2) * nn(B, B2)
    return math.sqrt(max(d2, 0.0) / ref)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--layers", default="0.attention.self.query,0.intermediate.dense,0.output.dense")
    p.add_argument("--tols", default="1e-5,1e-4,1e-3")
    a = p.parse_args()
    exp = pipeline.prepare(samples=a.samples, eval_samples=8)
    pipeline.collect(exp, ["gfwsvd"])
    for short in a.layers.split(","):
        name = f"encoder.layer.{short}"
        st = exp.stats[name]
        ref = nearest_kronecker(st, dtype=torch.float64, tol=1e-10, max_sweeps=200, refine=0)
        out = {"layer": short, "shape": list(st.shape), "K": st.num_samples, "storage": st.storage,
               "ref_s": round(ref.seconds, 2), "runs": []}
        for tol in map(float, a.tols.split(",")):
            for refine in (0, 2):
                t0 = time.perf_counter()
                f = nearest_kronecker(st, tol=tol, refine=refine)
                sec = time.perf_counter() - t0
                out["runs"].append({"tol": tol, "refine": refine, "seconds": round(sec, 2), "steps": f.sweeps,
                                    "refine_steps": f.refine_steps,
                                    "rel_diff": float(f"{kron_rel_diff(ref.A, ref.B, f.A, f.B):.2e}")})
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
