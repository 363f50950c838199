"""The study behind the README's tables: ``gfwsvd study`` on the embedded default.

    python bench/study.py [--out out/study] [--seeds 0,1,2] [--methods svd,fwsvd,kfac,gfwsvd,asvd,svdllm]
                          [--ratios 0.3,0.5,0.7] [--samples 128] [--eval-samples 256] [--task probe]

``--task probe`` runs the labelled task (topic classification of the default passages).
"""

import argparse
import sys

from gfwsvd_core.cli import main as cli

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out/study")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="svd,fwsvd,kfac,gfwsvd,asvd,svdllm")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--samples", default="128")
    p.add_argument("--eval-samples", default="256")
    p.add_argument("--task", default=None, help="e.g. probe; default: from the model (retrieval)")
    a = p.parse_args()
    task = ["--task", a.task] if a.task else []
    sys.exit(cli(["study", "--methods", a.methods, "--ratios", a.ratios, "--seeds", a.seeds, "--samples", a.samples,
                  "--eval-samples", a.eval_samples, "--out", a.out, "--quiet", *task]))
