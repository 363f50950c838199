"""One compression flow whose intermediate results are compared between 1 and 2 processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py FOLDER OUT.pt

Alone (no torchrun) :func:`run` is the one-process reference; under torchrun every rank runs it
and rank 0 saves what it got. $GFWSVD_DIST_DEVICE picks the device (default cpu, gloo). Used by
tests/test_distributed.py and bench/dist_check.py.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gfwsvd_core import distributed, pipeline  # noqa: E402
from gfwsvd_core.factorized import LowRankLinear  # noqa: E402

#: GFWSVD at its default tolerance and at a tight one: its factors differ between runs only at the
#: Krylov tolerance, which the truncation amplifies near close singular values
METHODS = ("gfwsvd", "gfwsvd[tol=1e-10,refine=8]", "fwsvd", "kfac", "svdllm")
SETTINGS = dict(samples=12, eval_samples=8, max_length=24, batch_size=3, seed=0)


def run(folder: str) -> dict:
    """Statistics, GFWSVD factors, decompositions and compressed weights of a tiny model."""
    torch.manual_seed(0)
    exp = pipeline.prepare(model=folder, device=distributed.local_device(os.environ.get("GFWSVD_DIST_DEVICE")),
                           **SETTINGS)
    pipeline.collect(exp, methods=list(METHODS))
    out = {"moments": {}, "factors": {}, "curves": {}, "weights": {}, "quadratic": {}}
    for name, s in exp.stats.items():
        out["moments"][name] = {"num_samples": s.num_samples, "num_tokens": s.num_tokens,
                                "xx_sum": s.xx_sum.clone(), "dd_sum": s.dd_sum.clone(),
                                "grad_sq_sum": s.grad_sq_sum.clone(), "grad_sum": s.grad_sum.clone()}
        out["quadratic"][name] = s.quadratic(torch.ones(s.shape))
    for method in METHODS:
        comp, rep = pipeline.run_compression(exp, method, ratio=0.5, evaluate=False)
        decs = comp.decompositions
        for name, d in decs.items():
            if method.startswith("gfwsvd"):
                A, B = d.factors
                out["factors"][(method, name)] = (A.clone(), B.clone())
            out["curves"][(method, name)] = d.exact_curve.clone()
        for name in decs:
            mod = comp.model.get_submodule(name)
            assert isinstance(mod, LowRankLinear)
            out["weights"][(method, name)] = (mod.up.weight @ mod.down.weight).detach().clone()
    return out


if __name__ == "__main__":
    shard = distributed.init(os.environ.get("GFWSVD_DIST_DEVICE", "cpu"))
    result = run(sys.argv[1])
    result["world"] = shard.world if shard else 1
    if shard is None or shard.is_main:
        torch.save(result, sys.argv[2])
    distributed.close()
