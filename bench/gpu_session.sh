#!/usr/bin/env bash
# Every GPU benchmark of bench/ in one short run on a lent GPU machine (results: docs/benchmarks.md).
#
# Command (from the repository root, on the GPU machine; OUT is where the logs and JSON files go):
#     OUT=/tmp/gpu-results bash bench/gpu_session.sh            # 345 s on one H200 (2026-12-04)
#     SMOKE=1 OUT=/tmp/gpu-smoke bash bench/gpu_session.sh      # ~3 min on 2 CPU cores: checks the script
#
# With INSTALL_WHEELS=1 (a machine without registry access), put wheels of the missing packages (pydantic,
# pydantic-core, annotated-types, typing-inspection, foolbox for its sample images, timm) in .whl/ first: they
# are installed into /tmp/site with the project itself (no dependency resolution; the machine's torch is used).
# Each step has its own time limit and a failing step does not stop the next one.
set -u
OUT=${OUT:?set OUT to a folder for the results}
SMOKE=${SMOKE:-0}
RES=${RES:-/tmp/gpu-session}  # logs and JSON; packed into $OUT/gpu_results.tar.gz after every step
rm -rf "$RES"; mkdir -p "$OUT" "$RES"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [ "${INSTALL_WHEELS:-0}" = 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "install failed"; exit 1; }
fi

step() {  # step NAME SECONDS CMD... : run one benchmark with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  echo "   rc=$? after $((SECONDS - t0))s"; tail -n 12 "$RES/$name.log"
  tar czf "$OUT/gpu_results.tar.gz" -C "$RES" .
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import platform, torch, timm
print("python", platform.python_version(), "torch", torch.__version__, "timm", timm.__version__,
      "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
} | tee "$RES/env.txt"

# Real images for the pretraining data pipeline: the foolbox samples (ImageNet 224 px, CIFAR, MNIST), flat.
IMAGES=/tmp/gpu-bench-images
mkdir -p "$IMAGES"
FOOLBOX=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('foolbox').origin))")
cp "$FOOLBOX"/data/*.png "$IMAGES"/

if [ "$SMOKE" = 1 ]; then
  DEV=cpu; PRE_RECIPES=tiny; PRE_SET=(--set data.batch_size=8); INF_ARCHS=test; INF=(--quick); STEPS=1; WARM=1
  DISTILL=(--quick); EXPORT=(--quick --device cpu)
else
  DEV=cuda; PRE_RECIPES=vits14,vitb14; PRE_SET=(--set data.batch_size=64); INF_ARCHS=vits14
  INF=(--batch-sizes 64,256); STEPS=10; WARM=3; DISTILL=(--preset vit_gpu --device cuda --steps 5)
  EXPORT=(--batches 16,64 --iters 20 --device cuda)
fi

# Issue 4: ViT-S/14 and ViT-B/14 training steps, bf16 compiled and not, fp32 eager as the reference row.
step pretrain_bf16 230 "$PY" bench/bench_pretrain.py --device "$DEV" --recipes "$PRE_RECIPES" --precision bf16 \
  --compile off,on --steps "$STEPS" --warmup "$WARM" --set "data.source=folder:$IMAGES" --set data.num_workers=0 \
  "${PRE_SET[@]}" --json "$RES/pretrain_bf16.json"
step pretrain_fp32 70 "$PY" bench/bench_pretrain.py --device "$DEV" --recipes "$PRE_RECIPES" --precision fp32 \
  --compile off --steps "$STEPS" --warmup "$WARM" --set "data.source=folder:$IMAGES" --set data.num_workers=0 \
  "${PRE_SET[@]}" --json "$RES/pretrain_fp32.json"
# Issue 6: distillation step per student, ViT-L/14 teacher shared by ViT-S/14 and ViT-B/14 students.
step distill 80 "$PY" bench/bench_distill.py "${DISTILL[@]}" --json "$RES/distill.json"
# Inference: eager fp32 backbone throughput beside the GEMM peak; then eager / compiled / bf16 per batch.
for arch in $INF_ARCHS; do
  step "inference_$arch" 40 "$PY" bench/bench_inference.py --device "$DEV" --arch "$arch" "${INF[@]}" \
    --json "$RES/inference_$arch.json"
done
step export_runtimes 80 "$PY" bench/bench_export.py "${EXPORT[@]}" --json "$RES/export.json"
echo "done"
