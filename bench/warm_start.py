"""Would a cheap low-rank pre-solve cut GFWSVD's Krylov steps? Measured on the embedded default.

Issue 9 asked whether low-rank iterates (the factors' spectra collapse to a few dozen
significant eigenvalues) could cut the exact maps. The question here: solve the nearest
Kronecker problem restricted to p-dimensional subspaces on both sides (``P_out^T G_k P_in``,
p x p samples: cheap), lift the input factor, and start the exact float32 Krylov solve from it.
That pays only if a *cheap* subspace makes the start accurate enough to drop steps. Three
subspaces per side:

- ``oracle``: the exact factors' top eigenvectors (not available in practice: the upper limit);
- ``sketch``: a randomised range of the samples, ``[G_1 W, ..., G_K W]`` (and ``G_k^T``);
- ``kfac``: the K-FAC moments' top eigenvectors (``sum x x^T``, ``sum d d^T``).

Per layer and p it prints the start's distance to the exact input factor (unit Frobenius norm)
and the exact solve's steps to the solver's bound 1e-5, beside the steps from the K-FAC start
(what the library does).

    python bench/warm_start.py [--samples 128] [--block 2]
"""

import argparse
import json

import torch

from gfwsvd_core import nearest_kronecker, pipeline
from gfwsvd_core.fisher.kronecker import _Samples
from gfwsvd_core.fisher.krylov import top_singular_triplets


def _unit(M):
    return M / torch.linalg.matrix_norm(M)


def _dist(M, R) -> float:
    M, R = _unit(M.double()), _unit(R.double())
    return float(torch.linalg.matrix_norm(M - R if (M * R).sum() >= 0 else M + R))


def _top(M, p):
    return torch.linalg.eigh(M.double())[1][:, -min(p, M.shape[0]):]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--block", type=int, default=2)
    ap.add_argument("--ranks", default="64,128,192")
    a = ap.parse_args()
    exp = pipeline.prepare(samples=a.samples, eval_samples=8)
    pipeline.collect(exp, ["gfwsvd"])
    gen = torch.Generator().manual_seed(0)
    for name, st in exp.stats.items():
        if f"layer.{a.block}." not in name:
            continue
        G = st.G.double()
        K, m, n = G.shape
        exact = nearest_kronecker(G, tol=1e-12, max_sweeps=200, diagnostics=False)
        A, B = _unit(exact.A), _unit(exact.B)
        S = _Samples(G=st.G)
        kfac = top_singular_triplets(S.in_map, S.out_map, st.xx_sum.float(), tol=1e-5, max_steps=50)
        row = {"layer": name, "shape": [m, n], "K": K, "kfac_start_steps": kfac.steps, "restricted": {}}
        for p in (int(x) for x in a.ranks.split(",")):
            s = max(1, p // K + 2)  # sketch columns per sample
            Yout = (G @ torch.randn(n, s, generator=gen, dtype=G.dtype)).permute(1, 0, 2).reshape(m, -1)
            Yin = (G.transpose(1, 2) @ torch.randn(m, s, generator=gen, dtype=G.dtype)).permute(1, 0, 2).reshape(n, -1)
            bases = {
                "oracle": (_top(A, p), _top(B, p)),
                "sketch": (torch.linalg.qr(Yin)[0][:, :p], torch.linalg.qr(Yout)[0][:, :p]),
                "kfac": (_top(st.xx_sum, p), _top(st.dd_sum, p)),
            }
            out = {}
            for label, (Pin, Pout) in bases.items():
                small = nearest_kronecker(Pout.T @ G @ Pin, tol=1e-10, max_sweeps=100, diagnostics=False)
                A0 = Pin @ small.A @ Pin.T
                r = top_singular_triplets(S.in_map, S.out_map, A0.float(), tol=1e-5, max_steps=50)
                out[label] = {"start_error": float(f"{_dist(A0, A):.2e}"), "steps": r.steps}
            row["restricted"][p] = out
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
