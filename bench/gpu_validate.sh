#!/usr/bin/env bash
# Issue 26, item 4: everything a lent GPU should measure, in one run of at most 10 minutes.
#
#   planner validate  ResNet-50 224 batch 32 (train BN), batch 128 --amp bf16 (--amp-rows), VGG-16 batch 32
#   planner calibrate --device cuda, then ResNet-50 batch 32 validated again with the calibrated profile
#   ResNet-50 batch 32 once more with the default caching allocator (no expandable segments; informative:
#   the planner's reserve assumes expandable segments, so it does not count towards the exit status)
# Every validate table has the reserved peak (max_memory_reserved) beside the allocated one, and the
# allocator model's figure for the same steps (columns reserved_bytes, modeled_reserved_bytes).
#
# On the device machine (PyTorch, pandas, matplotlib there; PuLP is not: carry it as a wheel):
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: -d .whl pulp==3.3.2
#   device run:  carry [".whl"], command "bash bench/gpu_validate.sh", timeout_s 580
# The tables (CSV), the plots (PNG), the calibrated profile and the log come back under $OUT;
# commit them under bench/results/gpu/.  SMALL=1 runs the same steps tiny on the CPU (a smoke
# test of this script: SMALL=1 OUT=/tmp/gv bash bench/gpu_validate.sh).
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
# lrcnn from this source tree without installing it: a folder whose lrcnn/ holds the package's own
# files and links lrcnn/models, lrcnn/planner, ... to the top-level folders (pyproject's package-dir)
SRC=$(mktemp -d)
mkdir "$SRC/lrcnn" && cp lrcnn/*.py "$SRC/lrcnn/" || exit 1
for d in models planner executor analysis; do ln -s "$PWD/$d" "$SRC/lrcnn/$d"; done
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${SMALL:-0}" = 1 ]; then
  DEV=cpu; R50="--model tiny_resnet --batch 4 --resolution 64"; R50AMP="--model tiny_resnet --batch 8 --resolution 64"
  VGG="--model tiny_vgg --batch 4 --resolution 64"; CAL="--quick"; STEPS=2
else
  DEV=cuda; R50="--model resnet50 --batch 32"; R50AMP="--model resnet50 --batch 128"
  VGG="--model vgg16 --batch 32"; CAL="--quick"; STEPS=3
fi
LOG="$OUT/log.txt"
{
  echo "# $(date -u +%FT%TZ) $(uname -m)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  echo "PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-} PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-} (unset: lrcnn runs set expandable_segments:True)"
} >"$LOG" 2>&1
status=0
run() {  # run NAME ARGS...: one validate, its table and plot under $OUT
  local name=$1; shift
  echo "## planner validate $* ($name)" >>"$LOG"
  $PY -m lrcnn validate "$@" --device "$DEV" --points 4 --steps "$STEPS" --quiet \
      --csv "$OUT/$name.csv" --png "$OUT/$name.png" >>"$LOG" 2>&1 || status=1
}
run validate-resnet50-b32 $R50
run validate-resnet50-b128-bf16 $R50AMP --amp bf16 --amp-rows
run validate-vgg16-b32 $VGG
echo "## planner calibrate --device $DEV $CAL" >>"$LOG"
$PY -m lrcnn calibrate --device "$DEV" $CAL -o "$OUT/profile-$DEV.json" >>"$LOG" 2>&1 || status=1
if [ -f "$OUT/profile-$DEV.json" ]; then
  echo "## planner validate $R50 --device-profile $OUT/profile-$DEV.json (calibrated)" >>"$LOG"
  $PY -m lrcnn validate $R50 --device "$DEV" --device-profile "$OUT/profile-$DEV.json" --points 4 \
      --steps "$STEPS" --quiet --csv "$OUT/validate-resnet50-b32-calibrated.csv" >>"$LOG" 2>&1 || status=1
fi
echo "## planner validate $R50 with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False (informative)" >>"$LOG"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False $PY -m lrcnn validate $R50 --device "$DEV" --points 2 --steps "$STEPS" \
    --quiet --csv "$OUT/validate-resnet50-b32-default-alloc.csv" >>"$LOG" 2>&1 || echo "(over budget here: informative)" >>"$LOG"
rm -f "$OUT"/validate-vgg16-b32.png "$OUT"/validate-resnet50-b128-bf16.png  # (8 files come back at most)
echo "## exit $status" >>"$LOG"
cat "$LOG"
exit $status
