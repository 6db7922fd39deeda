"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backend."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATASETS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own decoded-data cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "resnet_jax_cache"
    monkeypatch.setenv("RESNET_JAX_CACHE", str(cache))


@pytest.fixture(autouse=True, scope="session")
def _isolated_compile_cache(tmp_path_factory):
    """And its own compilation cache, set for the whole session: module-scoped fixtures train
    (and compile) before any function-scoped fixture runs. The test process uses it itself, as
    `resnet-jax` does, not only in the runs it starts: the same small programs (a net's
    initialisation, a train step) compile again and again in tests, and a cached program is the
    program compiled (test_cli.py checks that). One cache per test process (pytest -n 2): JAX
    writes entries without a lock (it locks only a bounded cache, which needs the `filelock`
    package, not installed here), and another process compiling the same programs at the same
    moment could read one half written."""
    from resnet_jax import parallel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESNET_JAX_COMPILE_CACHE",
                  str(tmp_path_factory.getbasetemp() / "jax-compile"))
        parallel.use_compilation_cache()
        yield


# The test files that take longest first (minutes on 2 cores, in this order), so that
# `pytest -n 2 --dist loadfile`, which hands whole files to whichever process is free, does not
# start one of them last and leave the other process idle at the end.
LONGEST_FIRST = ["test_slurm", "test_experiments", "test_distributed", "test_faults_processes",
                 "test_models", "test_train", "test_cli", "test_faults", "test_pipeline"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within
