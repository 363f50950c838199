"""torchrun with 2 processes against 1: equality of statistics, factors and compressed weights, and time.

    python bench/dist_check.py                 # CPU, gloo
    python bench/dist_check.py --device cuda   # on a GPU (NCCL with a GPU per process, else gloo)

Runs ``tests/dist_worker.py`` (statistics, GFWSVD / FWSVD / K-FAC / SVD-LLM decompositions and
compression of a small LLaMA-style model) in this process and under ``torchrun --nproc-per-node 2``,
and prints one line per figure. Times include each process's start-up (imports, model load).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def rel(x, y) -> float:
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args()
    os.environ["GFWSVD_DIST_DEVICE"] = a.device
    import dist_worker
    import tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="gfwsvd-dist-"))
    folder = tiny_models.save_tiny(tiny_models.tiny_llama(hidden=a.hidden, layers=a.layers), tmp / "model")
    t0 = time.perf_counter()
    one = dist_worker.run(str(folder))
    t_one = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE.parent / "tests")]),
           "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE.parent / "tests" / "dist_worker.py"), str(folder), str(tmp / "two.pt")],
                          env=env, capture_output=True, text=True)
    t_two = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        print(f"torchrun 2 processes on {a.device}: FAILED (exit {proc.returncode})")
        return 1
    two = torch.load(tmp / "two.pt", weights_only=False)
    mom = max(rel(two["moments"][n][k], v) for n, m in one["moments"].items() for k, v in m.items()
              if isinstance(v, torch.Tensor))
    print(f"torchrun 2 vs 1 process on {a.device}: moment sums rel diff {mom:.2e}")
    for method in dist_worker.METHODS:
        if method.startswith("gfwsvd"):
            fac = max(rel(torch.kron(*two["factors"][k]), torch.kron(*f)) for k, f in one["factors"].items()
                      if k[0] == method)
            print(f"torchrun 2 vs 1 process on {a.device}: {method} Kronecker products rel diff {fac:.2e}"
                  "  # target <= 1e-5")
        cur = max(rel(two["curves"][k], v) for k, v in one["curves"].items() if k[0] == method)
        w = max(rel(two["weights"][k], v) for k, v in one["weights"].items() if k[0] == method)
        print(f"torchrun 2 vs 1 process on {a.device}: {method} compressed weights rel diff {w:.2e}, "
              f"exact-quadratic curves {cur:.2e}")
    print(f"torchrun 2 vs 1 process on {a.device}: seconds {t_two:.1f} vs {t_one:.1f} in-process "
          f"(2-process time includes start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
