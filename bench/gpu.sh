#!/usr/bin/env bash
# Every GPU check of the project in one script, under 5 minutes on one GPU; one line per figure.
#   bash bench/gpu.sh                 # on a machine with CUDA
#   GFWSVD_BENCH_DEVICE=cpu GFWSVD_BENCH_QUICK=1 bash bench/gpu.sh   # smoke run of the script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=${GFWSVD_BENCH_DEVICE:-cuda}
QUICK=${GFWSVD_BENCH_QUICK:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
status=0
echo "== correctness and speed of the core (bench/gpu_checks.py)"
timeout 150 python bench/gpu_checks.py --device "$DEV" $([ "$QUICK" = 1 ] && echo --quick) || status=1
echo "== embedded default on $DEV: statistics pass vs each method's factors (bench/default_factors.py)"
SAMPLES=$([ "$QUICK" = 1 ] && echo 16 || echo 128)
OUT=$(mktemp)
timeout 150 python bench/default_factors.py --samples "$SAMPLES" --device "$DEV" >"$OUT" 2>/dev/null || status=1
python - "$OUT" <<'PY' || status=1
import json, sys
for raw in open(sys.argv[1]):
    d = json.loads(raw)
    if "stage" in d:
        print(f"default statistics pass: {d['seconds']} s ({d['layers']} layers, K = {d['K']})")
    elif "method" in d:
        print(f"default {d['method']} factors: {d['seconds']} s ({d['ratio_to_statistics']}x the statistics pass)")
PY
rm -f "$OUT"
exit $status
