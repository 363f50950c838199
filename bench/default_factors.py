"""Embedded default: the statistics pass against each method's per-layer factors, in one process.

Issue-9 target: GFWSVD's factors for all 36 layers in at most the time of the statistics pass.
Prints one JSON line per method (seconds, ratio to the statistics pass) and one for GFWSVD's
per-layer solver work (Krylov steps, eta, gap), so before/after runs can be compared.

    python bench/default_factors.py [--samples 128] [--methods svd,fwsvd,kfac,gfwsvd] [--solver krylov]
"""

import argparse
import json
import time

import torch

from gfwsvd_core import pipeline
from gfwsvd_core.methods import get_method


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--methods", default="svd,fwsvd,kfac,gfwsvd")
    p.add_argument("--solver", default=None, help="GFWSVD solver (default: the library's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the library's choice)")
    a = p.parse_args()
    methods = a.methods.split(",")
    exp = pipeline.prepare(samples=a.samples, eval_samples=8, device=a.device)
    t0 = time.perf_counter()
    pipeline.collect(exp, methods)
    stats_s = time.perf_counter() - t0
    s0 = next(iter(exp.stats.values()))
    print(json.dumps({"stage": "statistics", "seconds": round(stats_s, 2), "layers": len(exp.stats),
                      "sample_unit": exp.sample_unit, "K": s0.num_samples, "threads": torch.get_num_threads()}),
          flush=True)
    for name in methods:
        kw = {"solver": a.solver} if (name == "gfwsvd" and a.solver) else {}
        m = get_method(name, **kw)
        t0 = time.perf_counter()
        decs = pipeline.decompositions(exp, m)
        sec = time.perf_counter() - t0
        print(json.dumps({"method": pipeline.method_key(m), "seconds": round(sec, 2),
                          "ratio_to_statistics": round(sec / stats_s, 2)}), flush=True)
        if name == "gfwsvd":
            diag = {k.split("encoder.layer.")[-1]: d.weights.info["kronecker"] for k, d in decs.items()}
            print(json.dumps({"gfwsvd_layers": {k: {f: v.get(f) for f in ("sweeps", "refine_steps", "eta", "gap", "seconds")}
                                                for k, v in diag.items()},
                              "steps_total": sum(v.get("sweeps") or 0 for v in diag.values())}, default=str), flush=True)
            print(json.dumps(map_floor(exp, decs, sec)), flush=True)


def map_floor(exp, decs, factors_s: float) -> dict:
    """How much of GFWSVD's time is the Krylov maps themselves: one map pair timed per layer shape
    (best of 3) times the steps each layer took, its flops, and this machine's float32 GEMM rate."""
    from gfwsvd_core.fisher.kronecker import _as_samples
    from gfwsvd_core.statistics import map_pair_flops

    pair_s, flops, maps_s = {}, 0.0, 0.0
    for name, d in decs.items():
        st = exp.stats[name]
        shape = (st.out_features, st.in_features, st.storage)
        if shape not in pair_s:
            S, _ = _as_samples(st)
            A = torch.eye(S.n, dtype=S.dtype)
            B = torch.eye(S.m, dtype=S.dtype)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                S.in_map(S.out_map(A) + B)
                best = min(best, time.perf_counter() - t0)
            pair_s[shape] = best
        steps = d.weights.info["kronecker"]["sweeps"] if d.weights is not None else None
        steps = steps or 0
        T = 1 if st.storage == "materialized" else st.X.shape[1]
        flops += steps * st.num_samples * map_pair_flops(st.out_features, st.in_features, T, st.storage)
        maps_s += steps * pair_s[shape]
    a = torch.randn(2048, 2048)
    a @ a
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    gemm = 2 * 2048**3 / best
    return {"maps_seconds_at_these_steps": round(maps_s, 2), "share_of_factors": round(maps_s / factors_s, 3),
            "map_gflop": round(flops / 1e9, 1), "maps_gflops_per_s": round(flops / maps_s / 1e9, 1),
            "gemm_2048_gflops_per_s": round(gemm / 1e9, 1)}

if __name__ == "__main__":
    main()
