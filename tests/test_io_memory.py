"""Rejected folders cost almost no memory: load_compressed validates before it allocates.

How it is measured, and why: ``tracemalloc`` does not see torch's allocations, and the pytest
process has freed memory from earlier tests that a new allocation could reuse without raising its
resident size. So the loads run in a fresh subprocess. There, one valid folder is loaded first
(every lazily imported module on the load path is imported); then, for each folder, freed heap
memory is handed back to the OS (``malloc_trim``), Linux's resident high-water mark is reset
(``echo 5 > /proc/self/clear_refs``) and the extra memory is ``VmHWM`` after the call minus
``VmRSS`` before. A control allocation of 128 MiB measured last, in the same way, proves that
the method still sees allocations after all the others.
Where ``clear_refs`` cannot be written the lifetime ``ru_maxrss`` is used instead, which can only
overstate the figure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gfwsvd_core.io import save_compressed
from test_io import _compress

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 50

CHILD = r"""
import ctypes, gc, json, resource, sys, time
from pathlib import Path
import torch
from gfwsvd_core.io import CompressedFormatError, load_compressed

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    trim = lambda pad: 0

def window(fn):
    gc.collect()
    trim(0)  # hand freed heap pages back, so that no window can reuse an earlier one's memory
    try:
        Path("/proc/self/clear_refs").write_text("5")
        peak = lambda: kib("VmHWM")
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, t0 = kib("VmRSS"), time.perf_counter()
    try:
        fn()
        outcome = "loaded"
    except CompressedFormatError as exc:
        outcome = "rejected: " + str(exc)
    except BaseException as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    return {"outcome": outcome, "extra_mib": max(0, peak() - start) / 1024, "seconds": time.perf_counter() - t0}

valid, cases = sys.argv[1], json.loads(sys.argv[2])
load_compressed(valid)  # warm-up: imports everything the load path needs
out = {name: window(lambda f=folder: load_compressed(f)) for name, folder in cases.items()}
out["control"] = window(lambda: torch.ones(32 * 2**20).sum())  # 128 MiB
print(json.dumps(out))
"""


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _edit_tensor(folder: Path, key: str, dtype: torch.dtype) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(folder / "model.safetensors"))


def _inflate(cfg):  # built for real: ~ +770 MiB (2M x 32 embedding, 1M-wide MLPs) before the fix
    cfg.update(vocab_size=2_000_000, intermediate_size=1_000_000)


def _huge_rank(cfg):  # a 32 x 32 layer of rank 2e6 (no tensors to contradict it): +488 MiB before the fix
    cfg["gfwsvd"]["ranks"]["encoder.layer.1.attention.self.key"] = 2_000_000


def _many_layers(cfg):  # 20 000 layers: minutes and GiBs of module objects, even on meta
    cfg["num_hidden_layers"] = 20_000


CASES = {
    "inflated config": (lambda f: _edit_config(f, _inflate), "wrong shape"),
    "huge rank": (lambda f: _edit_config(f, _huge_rank), "a rank must be at most 32"),
    "int64 tensor": (lambda f: _edit_tensor(f, "encoder.layer.0.output.dense.down.weight", torch.int64),
                     "needs a floating dtype"),
    "float64 tensor": (lambda f: _edit_tensor(f, "encoder.layer.0.output.dense.down.weight", torch.float64),
                       "mixes floating dtypes"),
    "inflated layer count": (lambda f: _edit_config(f, _many_layers), "more than .* tensors"),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to read resident memory")
    base = tmp_path_factory.mktemp("io-memory")
    valid = save_compressed(_compress("bert"), base / "valid")
    folders = {}
    for i, (name, (damage, _)) in enumerate(CASES.items()):
        folders[name] = str(shutil.copytree(valid, base / f"bad-{i}"))
        damage(Path(folders[name]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHILD, str(valid), json.dumps(folders)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_measurement_sees_allocations(measured):
    assert measured["control"]["extra_mib"] >= 120, measured["control"]


@pytest.mark.parametrize("case", list(CASES))
def test_rejected_folder_costs_under_50_mib(case, measured):
    got = measured[case]
    print(f"{case}: +{got['extra_mib']:.1f} MiB, {got['seconds']:.2f} s")
    assert got["outcome"].startswith("rejected: ") and re.search(CASES[case][1], got["outcome"]), got
    assert got["extra_mib"] < LIMIT_MIB, got
