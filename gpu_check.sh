#!/usr/bin/env bash
# Every CUDA path run once (issue 18), on one machine with ≥ 1 NVIDIA GPU, in ~5-8 minutes:
#
#     bash gpu_check.sh                 # work folder: a fresh /tmp/gpu_check.XXXXXX (or $GPU_CHECK_DIR)
#
# One line per item: PASS, FAIL (with the tail of its log) or SKIP (with the reason), then a summary.
# Each item is small (a few optimiser steps); its full output is in WORK/logs/<item>.log.
#   dataloader_224   ResNet-50 pre-training at 224 px through the DataLoader on a generated ImageNet-layout
#                    JPEG folder, reconstruction PNGs on (--vis-every 1)
#   device_data      the GPU-resident loader (--device-data on, fake data)
#   torchrun_1       torchrun --standalone --nproc_per_node=1
#   torchrun_2       --nproc_per_node=2, DDP + SyncBatchNorm (only where nvidia-smi -L shows ≥ 2 GPUs)
#   bf16, fp16       --precision bf16, --precision fp16 (GradScaler)
#   compile          --compile
#   sigterm_resume   SIGTERM to a running train.py: exit 143 and a checkpoint; the same command resumes
#   probe, finetune, export   eval_linear.py on dataloader_224's checkpoint
#   bench_resnet50, bench_vit_base   bench.py at 224 px, batch 128 (their markdown rows are printed)
set -u
cd "$(dirname "$0")"
WORK=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
LOGS=$WORK/logs RUNS=$WORK/runs IMAGES=$WORK/imagenet
mkdir -p "$LOGS" "$RUNS"
PASSED=() FAILED=() SKIPPED=()
SMALL=(--arch resnet18 --data fake --epochs 1 --max-steps 10 --vis-every 0 --out-dir "$RUNS")  # a 32-px ResNet-18/16
T0=$SECONDS

# check NAME LIMIT_S COMMAND...: run COMMAND (a function below; each python3 in it gets LIMIT_S seconds at most)
# with its output in LOGS/NAME.log, and print one line.
check() {
  local name=$1 start=$SECONDS rc=0
  LIMIT=$2
  shift 2
  "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then
    printf 'PASS  %-16s %4ds\n' "$name" $((SECONDS - start))
    PASSED+=("$name")
  else
    printf 'FAIL  %-16s %4ds  exit %s, log %s:\n' "$name" $((SECONDS - start)) "$rc" "$LOGS/$name.log"
    tail -n 4 "$LOGS/$name.log" | sed 's/^/        /'
    FAILED+=("$name")
  fi
}
skip() { printf 'SKIP  %-16s %s\n' "$1" "$2"; SKIPPED+=("$1"); }
py() { timeout -k 10 "$LIMIT" python3 "$@"; }  # past LIMIT: SIGTERM (train.py checkpoints), then SIGKILL
train() { py train.py "$@"; }
has_png() { ls "$1"/recon_*.png >/dev/null && test -s "$1/checkpoint.pt"; }

make_images() {  # ImageNet layout: IMAGES/{train,val}/<class>/*.JPEG, 4 classes, 256×256 to 256×320 px
  py - "$IMAGES" <<'EOF'
import sys
from pathlib import Path

import torch
from torchvision.io import write_jpeg

g = torch.Generator().manual_seed(0)
for split, n in (("train", 32), ("val", 8)):
    for c in range(4):
        folder = Path(sys.argv[1]) / split / f"n0000000{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):  # smooth colour blobs: upsampled noise, a different size every few images
            small = torch.rand(3, 8, 8, generator=g) * 255
            img = torch.nn.functional.interpolate(small[None], size=(256, 256 + 32 * (i % 3)), mode="bicubic")[0]
            write_jpeg(img.clamp(0, 255).to(torch.uint8), str(folder / f"img_{i:03d}.JPEG"), quality=90)
print("wrote", sum(1 for _ in Path(sys.argv[1]).rglob("*.JPEG")), "JPEGs under", sys.argv[1])
EOF
}

dataloader_224() {
  train --arch resnet50 --width 64 --data imagenet --data-dir "$IMAGES" --img-size 224 --batch-size 32 --epochs 1 --max-steps 4 \
    --workers 4 --device-data off --vis-every 1 --out-dir "$RUNS" --run-name dataloader_224 && has_png "$RUNS/dataloader_224"
}
device_data() { train "${SMALL[@]}" --device-data on --run-name device_data; }
torchrun_n() { py -m torch.distributed.run --standalone --nproc_per_node="$1" train.py "${SMALL[@]}" --run-name "torchrun_$1"; }
precision() { train "${SMALL[@]}" --precision "$1" --run-name "precision_$1"; }
compiled() { train "${SMALL[@]}" --compile --run-name compile; }

sigterm_resume() {  # SIGTERM mid-run: exit 143 with a checkpoint; the same command (a few steps more) resumes
  local args=(--arch resnet18 --data fake --epochs 1000 --log-every 1 --vis-every 0 --out-dir "$RUNS" --run-name sigterm)
  python3 train.py "${args[@]}" &  # python3 itself is the background job: the signal goes to train.py
  local pid=$! rc step
  for _ in $(seq 180); do [ -s "$RUNS/sigterm/log.jsonl" ] || ! kill -0 "$pid" 2>/dev/null && break; sleep 1; done
  sleep 2
  kill -TERM "$pid"
  (sleep 90; kill -KILL "$pid" 2>/dev/null) &  # it should finish its step, checkpoint and exit long before
  wait "$pid"
  rc=$?
  echo "train.py exited with $rc after SIGTERM"
  [ "$rc" = 143 ] && test -s "$RUNS/sigterm/checkpoint.pt" || return 1
  grep -q "stopped by SIGTERM" "$LOGS/sigterm_resume.log" || return 1  # train.py's own exit, not a kill
  step=$(py -c "import sys, runtime; print(runtime.load_checkpoint(sys.argv[1]).step)" "$RUNS/sigterm/checkpoint.pt")
  echo "checkpoint at step $step; resuming to step $((step + 5))"
  train "${args[@]}" --max-steps $((step + 5)) | tee "$WORK/resume.out" && grep -q "resuming at" "$WORK/resume.out" &&
    py -c "import sys, runtime; s = runtime.load_checkpoint(sys.argv[1]).step; print('final step', s); assert s == $step + 5" \
      "$RUNS/sigterm/checkpoint.pt"
}

# --preset official: §7's arch recipes (RSB's BCE, RandAugment, the 160/224 crops); a folder alone takes the small-data ones.
EVAL=(--checkpoint "$RUNS/dataloader_224/checkpoint.pt" --data-dir "$IMAGES" --preset official --epochs 1 --batch-size 32 --workers 4 \
      --results "$WORK/results.jsonl")
probe() { py eval_linear.py "${EVAL[@]}"; }
finetune() { py eval_linear.py "${EVAL[@]}" --finetune; }
export_r50() {
  py eval_linear.py --checkpoint "$RUNS/dataloader_224/checkpoint.pt" --export "$WORK/resnet50.pth" &&
    py -c "import sys, torch, torchvision
torchvision.models.resnet50().load_state_dict(torch.load(sys.argv[1], weights_only=True)); print('torchvision loads it')" \
      "$WORK/resnet50.pth"
}
bench_row() { py bench.py --arch "$1" --img-size 224 --batch-size 128; }

python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print(f'GPU: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible); torch {torch.__version__}, CUDA {torch.version.cuda}')" \
  || { echo "FAIL  no CUDA GPU: this check needs one"; exit 1; }
echo "work folder: $WORK"
check make_images 120 make_images
check dataloader_224 240 dataloader_224
check device_data 120 device_data
check torchrun_1 150 torchrun_n 1
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$GPUS" -ge 2 ]; then check torchrun_2 180 torchrun_n 2
else skip torchrun_2 "nvidia-smi -L lists $GPUS GPU(s): the 2-process DDP + SyncBatchNorm run needs 2"; fi
check bf16 120 precision bf16
check fp16 120 precision fp16
check compile 300 compiled
check sigterm_resume 300 sigterm_resume
if [[ " ${PASSED[*]} " == *" dataloader_224 "* ]]; then
  check probe 180 probe
  check finetune 180 finetune
  check export 120 export_r50
else
  for item in probe finetune export; do skip "$item" "dataloader_224 failed: no checkpoint to evaluate"; done
fi
check bench_resnet50 240 bench_row resnet50
check bench_vit_base 240 bench_row vit_base
for name in bench_resnet50 bench_vit_base; do grep -A3 "^markdown:" "$LOGS/$name.log" | tail -n 1; done

echo "summary: ${#PASSED[@]} passed, ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped in $((SECONDS - T0)) s" \
  "${FAILED[*]:+(failed: ${FAILED[*]})}${SKIPPED[*]:+ (skipped: ${SKIPPED[*]})}"
[ "${#FAILED[@]}" = 0 ]
