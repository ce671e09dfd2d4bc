#!/usr/bin/env bash
# One lease of a GPU machine, in one call: the machine's facts, a smoke test, a full seed recipe
# on CIFAR-10 (JPEG copy), and benchmarks/throughput.py against PyTorch CUDA (fp32 and bf16).
# Each stage has a time limit of its own and writes what it has to $OUT as it goes, so a stage
# that fails or runs out of time leaves the others' results.
#
#   OUT=/tmp/out DATA_TGZ=scratch/cifar10-jpeg.tar.gz bash benchmarks/gpu_session.sh [TRAIN_S] [BENCH_S]
#
# Runs from the repository root with the image's own python3 and packages (jax, flax, optax,
# orbax, torch: no install; jaxcnn from the tree through PYTHONPATH). TRAIN_S, BENCH_S: the
# training and benchmark stages' limits in seconds (default 270 and 300); TRAIN_ARGS, BENCH_ARGS
# (environment): the two commands' arguments; a limit of 0 skips that stage.
#
# What it took on an H200 (2026-12-04, benchmarks/RESULTS-gpu-h200.md): machine facts and smoke
# 34 s; the seed001 run 112 s; the benchmark's first 10 cases (resnet18_cifar, simple_cnn,
# resdensenet_cifar fp32) 160 s, ~100 s of it compiling side by side; densenet_bc_100_12 and
# resdensenet compile for 1-3 min each. The whole default benchmark needs ~10 minutes: within a
# 15-minute lease give it BENCH_S=540 and TRAIN_S=0, or split the models over two calls.
set -u
OUT=${OUT:-/tmp/jaxcnn-gpu-out}
DATA_TGZ=${DATA_TGZ:-scratch/cifar10-jpeg.tar.gz}
TRAIN_S=${1:-270}
BENCH_S=${2:-300}
TRAIN_ARGS=${TRAIN_ARGS:---model resnet18_cifar --recipe seed001 --precision bf16}
BENCH_ARGS=${BENCH_ARGS:---models resnet18_cifar simple_cnn resdensenet_cifar densenet_bc_100_12 resdensenet \
  --precisions fp32 bf16 --rounds 3 --min-round-s 0.3 --prestart 10 --no-torch-compile --no-memory}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU in the benchmark
PY=python3
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{
  stamp "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc; free -g | head -2
  $PY -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]*-(plugin|pjrt)|flax|optax|orbax-checkpoint|chex|torch|triton|numpy|pillow|tensorflow-datasets|tensorboardx|tqdm|matplotlib) '
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "smoke: import, one jitted train step of a tiny model on the GPU"
timeout 120 $PY - > "$OUT/smoke.txt" 2>&1 <<'EOF'
import jax, numpy as np, optax
import jaxcnn
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import make_train_step
print("backend", jax.default_backend(), jax.devices())
m = jaxcnn.create_model("resnet18_cifar", num_classes=10, stage_sizes=(1, 1, 1, 1), width=8)
s = create_train_state(m, optax.adamw(1e-3), image_size=32, seed=0)
step = make_train_step(augment=None, num_classes=10, mean=(120.,) * 3, std=(64.,) * 3)
b = {"image": np.zeros((8, 32, 32, 3), np.uint8), "label": np.zeros(8, np.int32), "mask": np.ones(8, bool)}
s, met = step(s, jax.device_put(b))
print("loss", float(met["loss"]), "on", met["loss"].devices())
EOF
rc=$?
stamp "data"
mkdir -p /tmp/cifar10 && tar xzf "$DATA_TGZ" -C /tmp/cifar10 && ls /tmp/cifar10
if [ $rc -eq 0 ]; then  # the whole training path (loader, checkpoints, report) on 200 images
  stamp "smoke: one epoch of simple_cnn on 20 images per class"
  timeout 120 $PY experiments/cifar10.py --model simple_cnn --epochs 1 --limit-per-class 20 \
    --data-dir /tmp/cifar10 --workdir /tmp/smoke-run --no-progress >> "$OUT/smoke.txt" 2>&1
  rc=$?
fi
tail -n 30 "$OUT/smoke.txt"
if [ $rc -ne 0 ]; then stamp "smoke failed (rc $rc): stopping"; exit 1; fi


if [ "$TRAIN_S" -gt 0 ]; then
  stamp "training: experiments/cifar10.py $TRAIN_ARGS (limit $TRAIN_S s)"
  timeout "$TRAIN_S" $PY experiments/cifar10.py $TRAIN_ARGS --data-dir /tmp/cifar10 \
    --workdir /tmp/run --no-progress > "$OUT/train.log" 2>&1
  stamp "training rc $?"
  tail -n 25 "$OUT/train.log"
  (cd /tmp/run 2>/dev/null && tar czf "$OUT/run.tar.gz" --exclude=checkpoints . )
fi

if [ "$BENCH_S" -gt 0 ]; then
  stamp "benchmark (limit $BENCH_S s)"
  timeout "$BENCH_S" $PY benchmarks/throughput.py $BENCH_ARGS --data-dir /tmp/cifar10 \
    --out "$OUT/RESULTS-gpu.md" > "$OUT/bench.log" 2>&1
  stamp "benchmark rc $?"
  tail -n 40 "$OUT/bench.log"
fi
stamp "done"
