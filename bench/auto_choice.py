"""What auto chooses, and budget against uniform ranks (the evidence issue, item 5).

One seed of the embedded default: per kept ratio, how many layers auto gives to each candidate
at its budget ranks and at uniform ranks, and the held-out metrics of both allocations beside
the best single methods. One JSON line per ratio.

    python bench/auto_choice.py [--task probe] [--samples 64] [--eval-samples 256]
"""
import argparse
import collections
import json

from gfwsvd_core import pipeline

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--task", default=None)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--ratios", default="0.3,0.5")
    a = p.parse_args()
    opts = {"samples": a.samples, "eval_samples": a.eval_samples, **({"task": a.task} if a.task else {})}
    exp = pipeline.prepare(**opts)
    pipeline.collect(exp, ["auto"])
    folds = [exp.fold_stats[i][exp.layers[0]].num_samples for i in (0, 1)]
    for ratio in (float(r) for r in a.ratios.split(",")):
        row = {"task": exp.bundle.task, "ratio": ratio, "fold_samples": folds}
        for spec in ("auto", "auto[allocation=uniform]", "kfac", "svdllm"):
            comp, rep = pipeline.run_compression(exp, spec, ratio=ratio)
            row[spec] = {"metrics": rep["metrics"], "kept": round(rep["kept_ratio"]["layers"], 4)}
            if spec.startswith("auto"):
                row[spec]["chosen"] = dict(collections.Counter(r.get("chosen_method") for r in rep["layers"]
                                                               if not r["dense"]))
                row[spec]["dense_layers"] = len(rep["dense_layers"])
        print(json.dumps(row), flush=True)
