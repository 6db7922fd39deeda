#!/usr/bin/env bash
# Every accelerator number issues 5 and 17 ask for, in one command on a bare machine with one GPU
# (benchmarks/tpu_check.sh runs this script for a TPU VM: KIND=tpu):
#
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh OUT_DIR
#   SMOKE=1 bash benchmarks/gpu_check.sh OUT_DIR    # every kind of step once at tiny sizes, to
#                                                   # check the script (CPU too; see below)
#   DRY=1 bash benchmarks/gpu_check.sh OUT_DIR      # only print the commands it would run
#
# Writes one results file, OUT_DIR/results.md (the machine, versions and date, then every table
# below), with the raw outputs beside it:
# 1. resnet-jax bench, float32 and bfloat16: ResNet-20/56/110 at batch 128 (1 and 8 seeds per
#    program) and ResNet-50 at batch 256 on 224x224 (ImageNet), on 1 device (and on all of a
#    TPU host's chips): images/s, compile time, model FLOPs, fraction of peak, memory per image;
# 2. (GPU) benchmarks.compare: the CIFAR nets in PyTorch on the same GPU, with the ratio;
# 3. benchmarks.host_overhead, where the checkout has it: the host's cost per call of the
#    compiled step, and the training loop with steps_per_call;
# 4. the paper's schedule (64k iterations of 128) for ResNet-20 and ResNet-110: the real training
#    loop (on-device augmentation, logging, evaluation, checkpoints) for SCHEDULE_STEPS steps on
#    synthetic CIFAR-shaped data (evaluations on 512 images, not 10,000), its steady rate
#    extrapolated to 64k steps; the first run also writes a profile_steps trace of 5 steps
#    (OUT_DIR/schedule-20/profile: TensorBoard's profile plugin, or the .json.gz in Perfetto);
# 5. benchmarks.input_rate: CPU seconds per image of the ImageNet pipeline on INPUT_IMAGES JPEGs
#    of ImageNet's size made on the spot, streamed with 1, 2 and 8 threads and grain workers;
# 6. benchmarks.time_model: the PREDICTION of the paper's schedules on H100 / TPU v5e, with the
#    measured column filled from 1, the host cores from 5 and the host overhead from 3.
# A step that fails is named in results.md with its last error line; the others still run, and
# the script then exits 1.
#
# A bare machine may reach no package index, so carry wheels and set WHEELS to their folder
# (a GPU machine lent here has JAX, Flax, Optax, Orbax and PyTorch, but not the rest):
#   pip download --python-version 3.12 --only-binary=:all: -d wheels \
#     ml-collections grain tensorboardX tensorflow-datasets pytest
# (TPU: add jax[tpu] and its libtpu; pytest, because benchmarks.input_rate writes its
# array_record files with tests/test_data.py's writer.)
set -euo pipefail
[[ $# -eq 1 ]] || { echo "gpu_check: error: pass one OUT_DIR: bash benchmarks/gpu_check.sh OUT_DIR" >&2; exit 2; }
kind=${KIND:-gpu}
[[ $kind == gpu || $kind == tpu ]] || { echo "gpu_check: error: KIND=$kind: use gpu or tpu (benchmarks/tpu_check.sh)" >&2; exit 2; }
out=$(realpath -m -- "$1")
py=${PYTHON:-python3}
dry=${DRY:-0}
cd "$(dirname "$0")/.."

# step NAME CMD...: CMD with its output in $out/NAME and its errors in $out/NAME.err; a failure
# is noted in $out/failed.txt and the script goes on. DRY=1: prints CMD instead.
step() {
  local name=$1 start=$SECONDS status=0; shift
  if [[ $dry == 1 ]]; then echo "$name: $*"; return; fi
  "$@" > "$out/$name" 2> "$out/$name.err" || status=$?
  echo "| $name | $((SECONDS - start)) |" >> "$out/seconds.md"
  if (( status )); then
    echo "$name: exit $status: $(grep -v '^\s*$' "$out/$name.err" | tail -1)" >> "$out/failed.txt"
  fi
}

extra=()
[[ $kind == tpu ]] && extra=("jax[tpu]")
if [[ -n "${WHEELS:-}" ]]; then
  install=("$py" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation "${extra[@]}" pytest -e .)
  if [[ $dry == 1 ]]; then echo "install: ${install[*]}"
  else "${install[@]}" || { echo "gpu_check: error: installing from WHEELS=$WHEELS failed: carry the wheels named in benchmarks/gpu_check.sh" >&2; exit 2; }
  fi
fi
if [[ $dry != 1 ]]; then
  missing=$("$py" -c "import importlib.util as u; print(' '.join(m for m in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections', 'grain', 'tensorflow_datasets', 'tensorboardX', 'pytest', 'resnet_jax') if u.find_spec(m.split('.')[0]) is None))")
  [[ -z $missing ]] || { echo "gpu_check: error: $py lacks $missing: set WHEELS to a folder of the wheels named in benchmarks/gpu_check.sh" >&2; exit 2; }
  mkdir -p "$out"; rm -f "$out/failed.txt" "$out/seconds.md"
fi

if [[ "${SMOKE:-0}" == 1 ]]; then
  # Each kind of step once, as cheaply as it goes: bench rows in bfloat16 only, no ImageNet
  # bench rows and no host_overhead (DRY=1 shows the full run's commands), tiny nets and counts.
  depths=8 batch=16 steps=2 seeds=1 schedule_depths="8" schedule_steps=${SCHEDULE_STEPS:-12}
  dtypes="bfloat16"
  imagenet=()
  profile="(4,6)"
  input=(--make="${INPUT_IMAGES:-16}" --size=64 --batch=4 --batches=4 --per-image=8 --rounds=1 --threads=1 --workers=)
  host=()
  model=(--depths=8 --imagenet-depths=)
else
  depths=20,56,110 batch=128 steps=50 seeds=1,8 schedule_depths="20 110"
  schedule_steps=${SCHEDULE_STEPS:-2000}
  dtypes="float32 bfloat16"
  imagenet=(--config=resnet_jax/configs/imagenet.py:depth=50 --config.batch_size=256)
  profile="($((schedule_steps / 2 + 10)),$((schedule_steps / 2 + 15)))"  # clear of the evaluation
  input=(--make="${INPUT_IMAGES:-1000}" --threads=1,2,8 --workers=1,2,8)
  host=(--rounds=3)
  model=()
fi
config=resnet_jax/configs/cifar.py
ndev=1
if [[ $dry != 1 ]]; then
  { if [[ $kind == gpu ]]; then
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    fi
    "$py" -c "import jax, flax, PIL; print('JAX', jax.__version__, 'Flax', flax.__version__, 'Pillow', PIL.__version__); print('devices:', jax.device_count(), jax.devices())"
    echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //')"
    echo "checkout: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    date -u; } > "$out/machine.txt"
  ndev=$(sed -n 's/^devices: \([0-9]*\) .*/\1/p' "$out/machine.txt")
fi

# 1. bench rows; with several chips (a TPU host), also on all of them.
device_counts=1
(( ndev > 1 )) && device_counts="1 $ndev"
for dtype in $dtypes; do
  for n in $device_counts; do
    step "bench-cifar-$dtype-$n.json" "$py" -m resnet_jax.main bench --config=$config:depth=20 \
      --depths=$depths --seeds=$seeds --config.dtype=$dtype --config.log_diagnostics=False \
      --config.batch_size=$batch --config.num_devices="$n" --steps=$steps --json
    if (( ${#imagenet[@]} )); then
      step "bench-imagenet-$dtype-$n.json" "$py" -m resnet_jax.main bench "${imagenet[@]}" \
        --config.dtype=$dtype --config.log_diagnostics=False --config.num_devices="$n" \
        --steps=$steps --json
    fi
  done
done

# 2. PyTorch on the same GPU.
if [[ $kind == gpu ]]; then
  step compare.md "$py" -m benchmarks.compare --depths=$depths --batch=$batch --steps=$steps \
    --json="$out/compare.json"
fi

# 3. The host's cost per step (benchmarks/host_overhead.py, issue 17 item 1), where it exists.
if [[ -f benchmarks/host_overhead.py && ${#host[@]} -gt 0 ]]; then
  step host_overhead.md "$py" -m benchmarks.host_overhead "${host[@]}"
fi

# 4. The paper's schedule through the training loop; a profile of 5 steps of the first net.
first=1
for depth in $schedule_depths; do
  args=()
  (( first )) && args=(--config.profile_steps="$profile")
  first=0
  [[ $dry == 1 ]] || { rm -rf "$out/schedule-$depth"; start=$(date +%s.%N); }
  step "schedule-$depth.log" "$py" -m resnet_jax.main train --config=$config:depth=$depth,dataset=synthetic \
    --config.batch_size=$batch --config.num_devices=1 --config.total_steps=$schedule_steps \
    --config.log_every_steps=$((schedule_steps / 10)) --config.eval_every_steps=$((schedule_steps / 2)) \
    --config.checkpoint_every_steps=$schedule_steps "${args[@]}" --workdir="$out/schedule-$depth"
  [[ $dry == 1 || ! -d "$out/schedule-$depth" ]] || echo "$start $(date +%s.%N)" > "$out/schedule-$depth/wall.txt"
done

# 5. The ImageNet input rate on this host.
step input_rate.md "$py" -m benchmarks.input_rate --data="$out/inet_like" "${input[@]}" \
  --json="$out/input_rate.json"

# 6. The time model, with what was measured above.
host_ms=()
if [[ $dry != 1 && -s "$out/host_overhead.md" ]]; then
  # Its first table (wall clock): "| per call | ms per step | +ms more than in one call | ...".
  ms=$(sed -n 's/^| per call | [0-9.]* | +\([0-9.]*\) |.*/\1/p' "$out/host_overhead.md" | head -1)
  [[ -n $ms ]] && host_ms=(--host-ms="$ms")
fi
measured=()
for f in "$out"/bench-*.json; do  # those a bench step completed
  "$py" -c "import json, sys; json.load(open(sys.argv[1]))" "$f" 2> /dev/null && measured+=(--measured="$f")
done
rate=()
[[ -s "$out/input_rate.json" ]] && rate=(--input-rate="$out/input_rate.json")
step time_model.md "$py" -m benchmarks.time_model "${model[@]}" "${host_ms[@]}" "${rate[@]}" \
  "${measured[@]}" --json="$out/time_model.json"

[[ $dry == 1 ]] && exit 0
"$py" - "$out" "$schedule_depths" "$kind" > "$out/results.md" <<'EOF'
import json, pathlib, sys
out, depths, kind = pathlib.Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3]
from resnet_jax import bench


def text(name):
    path = out / name
    return path.read_text().strip() if path.is_file() and path.stat().st_size else None


print(f"# {kind.upper()} check ({'benchmarks/gpu_check.sh' if kind == 'gpu' else 'benchmarks/tpu_check.sh'})\n")
print("```\n" + text("machine.txt") + "\n```")
failed = text("failed.txt")
print("\nFailed steps:\n" + "\n".join(f"- {line}" for line in failed.splitlines()) if failed
      else "\nEvery step ran.")
for path in sorted(out.glob("bench-*.json")):
    print(f"\n## bench: {path.stem.removeprefix('bench-')}\n")
    try:
        print(bench.markdown(json.loads(path.read_text())["rows"]))
    except (ValueError, KeyError):
        print("no rows: see failed steps")
for title, name in (("JAX against PyTorch, float32", "compare.md"),
                    ("Host overhead and steps_per_call", "host_overhead.md")):
    if text(name):
        print(f"\n## {title}\n\n" + text(name))
print("\n## The paper's schedule through the training loop\n")
print("| net | steps run | wall s (with compile) | steady images/s | paper schedule (64k x 128), min |\n|---|---:|---:|---:|---:|")
for depth in depths:
    metrics = out / f"schedule-{depth}" / "metrics.jsonl"
    if not metrics.is_file():
        print(f"| ResNet-{depth} | failed | | | |")
        continue
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rate = [r["examples_per_sec"] for r in records if "examples_per_sec" in r][-1]
    start, end = map(float, (out / f"schedule-{depth}" / "wall.txt").read_text().split())
    print(f"| ResNet-{depth} | {records[-1]['step']} | {end - start:.0f} | {rate:.0f} | "
          f"{64_000 * 128 / rate / 60:.1f} |")
traces = sorted((out / f"schedule-{depths[0]}" / "profile").rglob("*.xplane.pb"))
print(f"\nprofile_steps trace of ResNet-{depths[0]}: "
      + (", ".join(f"{p.relative_to(out)} ({p.stat().st_size / 1e6:.1f} MB)" for p in traces)
         or "none written")
      + f"; view: tensorboard --logdir={out / f'schedule-{depths[0]}' / 'profile'}")
for title, name in (("ImageNet input rate", "input_rate.md"),
                    ("Time model against the measurements", "time_model.md")):
    print(f"\n## {title}\n\n" + (text(name) or "missing: see failed steps"))
print("\n## Wall seconds per step of this script\n\n| step | s |\n|---|---:|\n" + text("seconds.md"))
EOF
cat "$out/results.md"
[[ ! -s "$out/failed.txt" ]]
