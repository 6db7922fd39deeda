"""The accelerator check scripts (benchmarks/gpu_check.sh, tpu_check.sh) end to end on CPU in
smoke mode, the time model's arithmetic, and the input-rate benchmark's refusals."""
import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import input_rate, time_model
from tests.test_distributed import env

REPO = pathlib.Path(__file__).resolve().parents[1]


def check(script, out, **extra):
    return subprocess.run(["bash", f"benchmarks/{script}", str(out)], cwd=REPO,
                          env=env(PYTHON=sys.executable, **extra), capture_output=True, text=True,
                          timeout=600)


# --- The scripts -----------------------------------------------------------------------------


def test_tpu_check_runs_every_check_in_smoke_mode_and_writes_one_results_file(tmp_path):
    """The whole shared script, as a TPU VM would run it, at tiny sizes on this CPU."""
    out = tmp_path / "out"
    run = check("tpu_check.sh", out, SMOKE="1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = (out / "results.md").read_text()
    assert run.stdout.strip() == results.strip()
    assert results.startswith("# TPU check") and "Every step ran." in results
    assert "## bench: cifar-bfloat16-1" in results  # (float32 and ImageNet rows: full run only)
    (row,) = json.loads((out / "bench-cifar-bfloat16-1.json").read_text())["rows"]
    assert row["net"] == "ResNet-8" and row["dtype"] == "bfloat16" and row["images_per_sec"] > 0
    assert "| ResNet-8 | 12 |" in results  # the schedule ran its 12 steps
    assert "no nvidia-smi" not in results and "JAX against PyTorch" not in results  # GPU only
    # A profile of the steps asked for, named in the results.
    assert list((out / "schedule-8" / "profile").rglob("*.xplane.pb"))
    assert "profile_steps trace of ResNet-8: schedule-8/profile/" in results
    # The input rate on freshly made JPEGs, and the time model reading it.
    rate = json.loads((out / "input_rate.json").read_text())
    assert rate["made"]["count"] == 16 and rate["serial_cpu_s_per_image"]["pipeline"] > 0
    assert "pipeline now: decode in the crop (draft)" in results
    assert "PREDICTION" in results and "| ResNet-8 | 1 TPU v5e | bfloat16 |" in results
    model = json.loads((out / "time_model.json").read_text())
    assert model["cpu_s_per_image"] == rate["serial_cpu_s_per_image"]["pipeline"]


def test_gpu_check_dry_run_names_the_gpu_steps_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    run = check("gpu_check.sh", out, DRY="1", WHEELS="/carried/wheels")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    install = next(line for line in lines if line.startswith("install: "))
    assert "--no-index --find-links /carried/wheels" in install and "jax[tpu]" not in install
    steps = {line.split(":", 1)[0] for line in lines}
    assert {"bench-cifar-float32-1.json", "bench-cifar-bfloat16-1.json",
            "bench-imagenet-float32-1.json", "bench-imagenet-bfloat16-1.json", "compare.md",
            "schedule-20.log", "schedule-110.log", "input_rate.md", "time_model.md"} <= steps
    schedule = next(line for line in lines if line.startswith("schedule-20.log: "))
    assert "--config.profile_steps=(1010,1015)" in schedule
    assert "imagenet.py:depth=50 --config.batch_size=256" in next(
        line for line in lines if line.startswith("bench-imagenet-bfloat16-1.json: "))
    if (REPO / "benchmarks" / "host_overhead.py").is_file():  # steps_per_call (issue 17, 1)
        assert "host_overhead.md" in steps
    assert not out.exists()
    tpu = check("tpu_check.sh", out, DRY="1", WHEELS="/w")
    assert "jax[tpu]" in tpu.stdout and "compare.md" not in tpu.stdout


@pytest.mark.parametrize("args, extra, message", [
    ([], {}, "pass one OUT_DIR"),
    (["out"], {"KIND": "cpu"}, "KIND=cpu: use gpu or tpu"),
])
def test_gpu_check_refuses_bad_input_in_one_line(tmp_path, args, extra, message):
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=REPO, env=env(**extra),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and message in run.stderr
    assert not (REPO / "out").exists()


# --- The time model --------------------------------------------------------------------------

ONE = time_model.Accelerator("1 X", "H100", 1, {"bfloat16": 1000e12}, ("X",))
EIGHT = time_model.Accelerator("8 X", "H100", 8, {"bfloat16": 1000e12}, ("X",))


def test_time_model_takes_the_slower_of_device_and_host_per_step():
    low, high, _ = time_model.UTILISATION[("cifar", "H100")]
    net = time_model.Net("cifar", 20, steps=64_000, batch=128, gflops_per_step=30.0)
    row = time_model.predict(net, ONE, "bfloat16", host_ms=1.2, steps_per_call=1,
                             cpu_s_per_image=0.002)
    assert row["net"] == "ResNet-20" and row["host_ms_per_step"] == pytest.approx(1.2)
    for end, u in (("fast", high), ("slow", low)):
        device_ms = 30e9 / (1000e12 * u) * 1e3
        assert row[end]["device_ms_per_step"] == pytest.approx(device_ms)
        step_ms = max(device_ms, 1.2)
        assert row[end]["bound"] == ("device" if device_ms >= 1.2 else "host")
        assert row[end]["hours"] == pytest.approx(64_000 * step_ms / 3.6e6)
        assert row[end]["images_per_sec"] == pytest.approx(128 / step_ms * 1e3)
        assert "host_cores" not in row[end]  # CIFAR lives on the device
    assert row["fast"]["bound"] == "host" and row["slow"]["bound"] == "device"
    # K steps per call divide the host's share; 8 chips divide the device's.
    fast = time_model.predict(net, EIGHT, "bfloat16", host_ms=1.2, steps_per_call=8,
                              cpu_s_per_image=None)
    assert fast["host_ms_per_step"] == pytest.approx(0.15)
    assert fast["slow"]["device_ms_per_step"] == pytest.approx(
        row["slow"]["device_ms_per_step"] / 8)


def test_time_model_counts_host_cores_for_the_streamed_input():
    net = time_model.Net("imagenet", 50, steps=450_360, batch=256, gflops_per_step=6281.0)
    row = time_model.predict(net, ONE, "bfloat16", host_ms=1.35, steps_per_call=1,
                             cpu_s_per_image=0.0025)
    for end in ("fast", "slow"):
        assert row[end]["bound"] == "device"
        assert row[end]["host_cores"] == pytest.approx(row[end]["images_per_sec"] * 0.0025)
    assert row["fast"]["host_cores"] > row["slow"]["host_cores"]


def test_measured_rows_fill_their_own_net_dtype_batch_and_device_only():
    net = time_model.Net("cifar", 20, steps=64_000, batch=128, gflops_per_step=30.0)
    rows = [time_model.predict(net, acc, "bfloat16", host_ms=1.0, steps_per_call=1,
                               cpu_s_per_image=None) for acc in time_model.ACCELERATORS]
    bench = {"net": "ResNet-20", "dtype": "bfloat16", "batch": 128, "seeds": 1, "devices": 1,
             "device": "NVIDIA H200", "ms_per_step": 2.0}
    time_model.measured(rows, [bench | {"dtype": "float32"}, bench | {"batch": 64},
                               bench | {"seeds": 8}, bench | {"net": "ResNet-56"}])
    assert not any("measured" in r for r in rows)
    time_model.measured(rows, [bench])
    h100, v5e, v5e8 = rows
    assert h100["measured"] == {"device": "NVIDIA H200", "ms_per_step": 2.0,
                                "hours": pytest.approx(64_000 * 2.0 / 3.6e6)}
    assert "measured" not in v5e and "measured" not in v5e8
    time_model.measured(rows, [bench | {"device": "TPU v5 lite", "devices": 8}])
    assert "measured" not in v5e and v5e8["measured"]["device"] == "TPU v5 lite"
    assert "| 1 H100 | bfloat16 |" in time_model.markdown(rows)


# --- The input rate --------------------------------------------------------------------------


def test_input_rate_refuses_a_folder_without_images_before_writing(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        input_rate.main([f"--data={tmp_path / 'none'}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds no images yet: add --make=N" in err
    assert not (tmp_path / "none").exists()


def test_made_images_have_imagenet_like_sizes():
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = [input_rate.image_size(rng) for _ in range(400)]
    ratios = {round(w / h, 2) for w, h in sizes}
    assert ratios <= {round(a / b, 2) for a, b in input_rate.ASPECTS}
    share = np.mean([max(s) == 500 for s in sizes])
    assert 0.85 < share < 0.95 and max(max(s) for s in sizes) <= 1000
