"""Benchmark: nearest_kronecker vs the published approach (NumPy loop inside SciPy svds).

The baseline, written here for the benchmark, follows the GFWSVD authors' ``krondecomp.py``:
per-sample gradients ``G_k`` are materialised, and a ``LinearOperator`` whose matvec loops over
samples in NumPy (``sum_k G_k^T B G_k``) is handed to ``scipy.sparse.linalg.svds(k=1)``.
Both run on the same data; the Kronecker products are compared without forming them:
``||A1(x)B1 - A2(x)B2||^2 = |A1|^2|B1|^2 + |A2|^2|B2|^2 - 2<A1,A2><B1,B2>``.

    python bench/kronecker.py                      # MiniLM FFN shape, synthetic gradients
    python bench/kronecker.py --data minilm        # real MiniLM gradients (default corpus)
    python bench/kronecker.py --m 256 --n 64 --K 16 --T 16   # quick smoke run

Prints one JSON line with both wall times, their ratio and the relative difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gfwsvd_core import nearest_kronecker  # noqa: E402


def synthetic(m: int, n: int, K: int, T: int, seed: int = 0):
    """Token inputs with a decaying channel spectrum and gradients coupled to the inputs."""
    g = torch.Generator().manual_seed(seed)
    mix_x = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[None, :]
    mix_d = torch.randn(m, m, generator=g) * torch.logspace(0, -2, m)[None, :]
    X = torch.randn(K, T, n, generator=g) @ mix_x.T  # (K, T, n)
    D = torch.randn(K, T, m, generator=g) @ mix_d.T  # (K, T, m)
    D = D * (1 + X[..., :1].abs())  # token-dependent gradient scale: not exactly K-FAC
    return X.contiguous(), D.contiguous()


def minilm(K: int, T: int, layer: str):
    """Real MiniLM gradients on the default corpus: one sample = one retrieval batch of T tokens.

    InfoNCE couples a batch, so a sample is a batch: 2 query/passage pairs
    (4 rows) of T/4 tokens each give samples of T tokens (padding included).
    """
    from gfwsvd_core import collect_statistics
    from gfwsvd_core.data import default_passages
    from gfwsvd_core.models import load_model
    from gfwsvd_core.tasks import get_task

    bundle = load_model("default", device="cpu")
    task = get_task("retrieval")
    texts = default_passages()[: 2 * K]
    batches = task.make_batches(bundle.tokenizer, texts, max_length=T // 4, batch_size=2)
    batches = [{k: torch.nn.functional.pad(v, (0, T // 4 - v.shape[1])) for k, v in b.items()} for b in batches]
    stats = collect_statistics(bundle.model, batches, task.fisher_loss, layers=[layer],
                               kinds=("samples",), sample_unit="batch", storage="factored")
    st = stats[layer]
    return st.X[:K].contiguous(), st.D[:K].contiguous()


def baseline(G: np.ndarray, tol: float = 0.0):
    """Published approach: svds on a LinearOperator whose maps loop over samples in NumPy."""
    from scipy.sparse.linalg import LinearOperator, svds

    K, m, n = G.shape
    count = [0]

    def matvec(v):  # vec(B) (m*m) -> vec(sum_k G_k^T B G_k) (n*n)
        count[0] += 1
        B = v.reshape(m, m)
        out = np.zeros((n, n), dtype=G.dtype)
        for k in range(K):
            out += G[k].T @ B @ G[k]
        return (out / K).reshape(-1)

    def rmatvec(u):  # vec(A) (n*n) -> vec(sum_k G_k A G_k^T) (m*m)
        count[0] += 1
        A = u.reshape(n, n)
        out = np.zeros((m, m), dtype=G.dtype)
        for k in range(K):
            out += G[k] @ A @ G[k].T
        return (out / K).reshape(-1)

    op = LinearOperator((n * n, m * m), matvec=matvec, rmatvec=rmatvec, dtype=G.dtype)
    u, s, vt = svds(op, k=1, tol=tol)
    A, B = u[:, 0].reshape(n, n), vt[0].reshape(m, m)
    if np.trace(A) < 0:  # the published code forgot this sign fix
        A, B = -A, -B
    return A * math.sqrt(s[0]), B * math.sqrt(s[0]), count[0]


def kron_rel_diff(A1, B1, A2, B2) -> float:
    A1, B1, A2, B2 = (torch.as_tensor(x).double() for x in (A1, B1, A2, B2))
    n11 = float((A1 * A1).sum() * (B1 * B1).sum())
    n22 = float((A2 * A2).sum() * (B2 * B2).sum())
    n12 = float((A1 * A2).sum() * (B1 * B2).sum())
    return math.sqrt(max(n11 + n22 - 2 * n12, 0.0) / n22)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1536)
    p.add_argument("--n", type=int, default=384)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--data", choices=["synthetic", "minilm"], default="synthetic")
    p.add_argument("--layer", default="encoder.layer.0.intermediate.dense")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--refine", type=int, default=2, help="float64 map pairs after the float32 solve (0: none)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="our arithmetic")
    p.add_argument("--baseline-dtype", choices=["float32", "float64"], default="float32",
                   help="float32 is what the published code runs; its single-precision ARPACK "
                        "is only accurate to ~1e-4, so float64 gives the accurate reference")
    a = p.parse_args(argv)

    if a.data == "minilm":
        X, D = minilm(a.K, a.T, a.layer)
    else:
        X, D = synthetic(a.m, a.n, a.K, a.T)
    K, T, n = X.shape
    m = D.shape[2]

    # ours (factored maps, K-FAC start); warm-up on a slice so one-off costs are not timed
    nearest_kronecker((X[:2].to(a.device), D[:2].to(a.device)), diagnostics=False)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = nearest_kronecker((X.to(a.device), D.to(a.device)), tol=a.tol, max_sweeps=200, diagnostics=False,
                             dtype=getattr(torch, a.dtype), refine=a.refine)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    out = {
        "shape": {"m": m, "n": n, "K": K, "T": T}, "data": a.data, "device": a.device,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "ours_dtype": a.dtype, "refine": a.refine, "ours_seconds": round(t_ours, 3), "ours_sweeps": ours.sweeps, "ours_converged": ours.converged,
    }
    if not a.skip_baseline:
        G = torch.bmm(D.transpose(1, 2), X).numpy().astype(a.baseline_dtype)  # (K, m, n) materialised
        t0 = time.perf_counter()
        A_b, B_b, nmv = baseline(G)
        t_base = time.perf_counter() - t0
        out.update({
            "baseline_dtype": a.baseline_dtype, "baseline_seconds": round(t_base, 3), "baseline_matvecs": nmv,
            "speedup": round(t_base / t_ours, 2),
            "kron_rel_diff": kron_rel_diff(ours.A.cpu(), ours.B.cpu(), A_b, B_b),
        })
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
