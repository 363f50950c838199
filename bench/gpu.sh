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
timeout 90 python bench/gpu_checks.py --device "$DEV" $([ "$QUICK" = 1 ] && echo --quick) || status=1
echo "== embedded default on $DEV: statistics pass vs each method's factors (bench/default_factors.py)"
SAMPLES=$([ "$QUICK" = 1 ] && echo 16 || echo 128)
OUT=$(mktemp)
timeout 70 python bench/default_factors.py --samples "$SAMPLES" --device "$DEV" >"$OUT" 2>/dev/null || status=1
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
echo "== torchrun: 2 processes against 1 on $DEV (bench/dist_check.py; one GPU: 2 processes share it via gloo)"
timeout 50 python bench/dist_check.py --device "$DEV" 2>/dev/null | grep "torchrun" || status=1
echo "== real shapes on $DEV in bfloat16: plan vs measured per stage (bench/scale.py)"
if [ "$QUICK" = 1 ]; then
  echo "scale: skipped in the quick smoke run"
else
  timeout 90 python bench/scale.py --device "$DEV" --dtype bfloat16 --llama-layers all --samples 16 --length 512 \
    --llama-length 512 2>/dev/null | grep -E "^(stage|statistics|factors|compress|export|reload) |shape, 2 layers" \
    | sed 's/^/scale: /' || status=1
fi
exit $status
