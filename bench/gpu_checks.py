"""GPU checks of the core: correctness on the device against a CPU float64 reference, then speed.

Run by ``bench/gpu.sh`` (one line per figure). ``--quick`` shrinks every shape so the script can be
smoke-tested on a CPU (``--device cpu --quick``); the figures that matter come from a GPU run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from gfwsvd_core import collect_statistics, nearest_kronecker  # noqa: E402
from gfwsvd_core.fisher.kronecker import nearest_kronecker_batch  # noqa: E402


def line(name: str, value, unit: str = "", note: str = "") -> None:
    v = f"{value:.3g}" if isinstance(value, float) else str(value)
    print(f"{name}: {v}{(' ' + unit) if unit else ''}{('  # ' + note) if note else ''}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kron_rel_diff(A1, B1, A2, B2) -> float:
    A1, B1, A2, B2 = (t.double().cpu() for t in (A1, B1, A2, B2))
    n11 = float((A1 * A1).sum() * (B1 * B1).sum())
    n22 = float((A2 * A2).sum() * (B2 * B2).sum())
    n12 = float((A1 * A2).sum() * (B1 * B2).sum())
    return math.sqrt(max(n11 + n22 - 2 * n12, 0.0) / n22)


def samples(m, n, K, T, device, seed=0):
    """Factored samples generated on the device: decaying channel spectra, coupled gradients."""
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(K, T, n, generator=g, device=device) * torch.logspace(0, -2, n, device=device)
    D = torch.randn(K, T, m, generator=g, device=device) * torch.logspace(0, -2, m, device=device)
    return X, D * (1 + X[..., :1].abs())


def correctness(device: str) -> None:
    X, D = samples(96, 64, 8, 16, "cpu")
    ref = nearest_kronecker((X.double(), D.double()), tol=1e-10, max_sweeps=200, refine=0)
    for form in ("factored", "materialized"):
        src = (X.to(device), D.to(device)) if form == "factored" else torch.bmm(D.transpose(1, 2), X).to(device)
        got = nearest_kronecker(src, tol=1e-6)
        assert got.A.device.type == torch.device(device).type, "factors left the device"
        line(f"kronecker {form} on {device} vs cpu float64, rel diff", kron_rel_diff(got.A, got.B, ref.A, ref.B),
             note="target <= 1e-5")
        got = nearest_kronecker(src, tol=1e-6, refine=2, tf32=True)
        line(f"kronecker {form} on {device}, TF32 + refine 2, vs cpu float64, rel diff",
             kron_rel_diff(got.A, got.B, ref.A, ref.B), note="target <= 1e-5")
    import tiny_models
    from test_stats import lm_loss, make_batch

    model = tiny_models.tiny_llama()
    batches = [make_batch(B=3, T=6, seed=s) for s in range(2)]
    cpu = collect_statistics(model, batches, lm_loss)
    dev = collect_statistics(model.to(device), [{k: v.to(device) for k, v in b.items()} for b in batches], lm_loss)
    worst = 0.0
    for name in cpu:
        for f in ("grad_sq_sum", "xx_sum", "dd_sum"):
            a, b = getattr(cpu[name], f), getattr(dev[name], f).cpu()
            worst = max(worst, float((a - b).norm() / a.norm()))
    line(f"statistics on {device} vs cpu, worst rel diff", worst, note="target <= 1e-5")


def speed(device: str, quick: bool) -> None:
    shapes = [("bench shape 1536x384 K=32 T=128", 1536, 384, 32, 128),
              ("llama FFN 4096x11008 K=128 T=512", 4096, 11008, 128, 512)]
    if quick:
        shapes = [(f"{name} (quick: /8)", m // 8, n // 8, max(2, K // 8), max(2, T // 8)) for name, m, n, K, T in shapes]
    for name, m, n, K, T in shapes:
        X, D = samples(m, n, K, T, device)
        nearest_kronecker((X[:2], D[:2]), diagnostics=False)  # warm-up: kernels, allocator
        sync(device)
        t0 = time.perf_counter()
        f = nearest_kronecker((X, D), diagnostics=False, refine=0)
        sync(device)
        line(f"kronecker {name} on {device}", time.perf_counter() - t0, "s",
             note=f"{f.sweeps} steps; target <= 1 s for the llama FFN on a GPU")
        if device.startswith("cuda"):  # the float32 solve in TF32, then two float64 map pairs
            t0 = time.perf_counter()
            g = nearest_kronecker((X, D), diagnostics=False, refine=2, tf32=True)
            sync(device)
            line(f"  TF32 + refine 2, {name}", time.perf_counter() - t0, "s",
                 note=f"{g.sweeps} steps; rel diff to the float32 solve {kron_rel_diff(g.A, g.B, f.A, f.B):.1e}")
        del X, D
        if device.startswith("cuda"):
            line(f"  peak GPU memory for {name}", torch.cuda.max_memory_allocated() / 2**30, "GiB")
            torch.cuda.reset_peak_memory_stats()


def batched(device: str, quick: bool) -> None:
    """Small layers solved one by one against one batched Krylov iteration (GFWSVD's ``batch``,
    on by default on CUDA): MiniLM's 24 attention projections, 384 x 384, K = 16 materialised."""
    L, d, K = (6, 96, 4) if quick else (24, 384, 16)
    gs = []
    for seed in range(L):
        X, D = samples(d, d, K, 64, device, seed=seed)
        gs.append(torch.bmm(D.transpose(1, 2), X))  # (K, d, d) materialised
    nearest_kronecker_batch(gs[:2], diagnostics=False, refine=0)  # warm-up
    nearest_kronecker(gs[0], diagnostics=False, refine=0)
    sync(device)
    t0 = time.perf_counter()
    one = [nearest_kronecker(g, diagnostics=False, refine=0) for g in gs]
    sync(device)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = nearest_kronecker_batch(gs, diagnostics=False, refine=0)
    sync(device)
    t_many = time.perf_counter() - t0
    worst = max(kron_rel_diff(b.A, b.B, a.A, a.B) for a, b in zip(one, many))
    line(f"{L} small layers {d}x{d} K={K} on {device}: one by one / batched", t_one / t_many, "x",
         note=f"{t_one:.2f} s against {t_many:.2f} s; worst rel diff {worst:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="shapes / 8: a smoke run of this script")
    a = p.parse_args()
    line("device", torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device)
    correctness(a.device)
    speed(a.device, a.quick)
    batched(a.device, a.quick)


if __name__ == "__main__":
    main()
