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
    (and compile) before any function-scoped fixture runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESNET_JAX_COMPILE_CACHE",
                  str(tmp_path_factory.getbasetemp() / "jax-compile"))
        yield
