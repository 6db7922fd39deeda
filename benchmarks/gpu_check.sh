#!/usr/bin/env bash
# Every GPU number issue 5 asks for, in one command on a machine with one GPU:
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # SMOKE=1: tiny sizes, to check the script
#
# 1. resnet-jax bench, ResNet-20/56/110, float32 and bfloat16, 1 and 8 seeds per program:
#    images/s, compile time, model FLOPs and the fraction of the GPU's peak;
# 2. benchmarks.compare: the same nets in PyTorch (eager, torch.compile; NCHW, channels_last)
#    on the same GPU, with the ratio;
# 3. the paper's schedule (64k iterations of 128) for ResNet-20 and ResNet-110: the real
#    training loop (on-device augmentation, logging, evaluation, checkpoints) run for
#    SCHEDULE_STEPS steps on synthetic CIFAR-shaped data (evaluations on 512 images, not
#    10,000), its steady rate extrapolated to 64k steps.
# Writes everything under OUT_DIR and prints the tables last.
#
# The lent GPU machines have JAX, Flax, Optax, Orbax and PyTorch but not ml-collections, grain,
# tensorboardX or tensorflow-datasets. Carry their wheels and set WHEELS to their folder:
#   pip download --python-version 3.12 --only-binary=:all: -d wheels \
#     ml-collections grain tensorboardX tensorflow-datasets
set -euo pipefail
[[ $# -eq 1 ]] || { echo "gpu_check: error: pass one OUT_DIR: bash benchmarks/gpu_check.sh OUT_DIR" >&2; exit 2; }
out=$1
mkdir -p "$out"
py=${PYTHON:-python3}
if [[ -n "${WHEELS:-}" ]]; then
  "$py" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation -e . \
    || { echo "gpu_check: error: installing from WHEELS=$WHEELS failed: carry the wheels named above" >&2; exit 2; }
fi

if [[ "${SMOKE:-0}" == 1 ]]; then
  depths=8,14 batch=16 steps=2 seeds=1,2 schedule_depths="8" schedule_steps=${SCHEDULE_STEPS:-30}
else
  depths=20,56,110 batch=128 steps=50 seeds=1,8 schedule_depths="20 110"
  schedule_steps=${SCHEDULE_STEPS:-2000}
fi
config=resnet_jax/configs/cifar.py

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import jax, flax; print('JAX', jax.__version__, 'Flax', flax.__version__, jax.devices())"
  date -u; } > "$out/machine.txt"

for dtype in float32 bfloat16; do
  "$py" -m resnet_jax.main bench --config=$config:depth=20 --depths=$depths --seeds=$seeds \
    --config.dtype=$dtype --config.log_diagnostics=False --config.batch_size=$batch \
    --config.num_devices=1 --steps=$steps --json > "$out/bench-$dtype.json"
done

"$py" -m benchmarks.compare --depths=$depths --batch=$batch --steps=$steps \
  --json="$out/compare.json" > "$out/compare.md" 2> "$out/compare.err" \
  || echo "compare failed (PyTorch rows missing): $(tail -1 "$out/compare.err")" > "$out/compare.md"

for depth in $schedule_depths; do
  rm -rf "$out/schedule-$depth"
  start=$(date +%s.%N)
  "$py" -m resnet_jax.main train --config=$config:depth=$depth,dataset=synthetic \
    --config.batch_size=$batch --config.num_devices=1 --config.total_steps=$schedule_steps \
    --config.log_every_steps=$((schedule_steps / 10)) --config.eval_every_steps=$((schedule_steps / 2)) \
    --config.checkpoint_every_steps=$schedule_steps --workdir="$out/schedule-$depth" > "$out/schedule-$depth.log" 2>&1
  echo "$start $(date +%s.%N)" > "$out/schedule-$depth/wall.txt"
done

"$py" - "$out" "$schedule_depths" <<'EOF'
import json, pathlib, sys
out, depths = pathlib.Path(sys.argv[1]), sys.argv[2].split()
print((out / "machine.txt").read_text().strip())
from resnet_jax import bench
for dtype in ("float32", "bfloat16"):
    print(f"\nbench, {dtype}\n" + bench.markdown(json.loads((out / f"bench-{dtype}.json").read_text())["rows"]))
print("\nJAX against PyTorch, float32\n" + (out / "compare.md").read_text().strip())
print("\n| net | steps run | wall s (with compile) | steady images/s | paper schedule (64k x 128), min |\n|---|---:|---:|---:|---:|")
for depth in depths:
    run = out / f"schedule-{depth}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rate = [r["examples_per_sec"] for r in records if "examples_per_sec" in r][-1]
    start, end = map(float, (run / "wall.txt").read_text().split())
    print(f"| ResNet-{depth} | {records[-1]['step']} | {end - start:.0f} | {rate:.0f} | "
          f"{64_000 * 128 / rate / 60:.1f} |")
EOF
