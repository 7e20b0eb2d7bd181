"""Identity tests run in float64; float32 behaviour is tested with explicit dtypes.

Most of the suite's time is XLA compilation. The example scripts and benchmarks
run in subprocesses, and several compile the same programs (the digits UNet's
training step, a benchmark's routes); one persistent compilation cache per test
run lets them share those. It lives in a temporary folder that the run's first
process makes and removes at the end, so nothing survives into another run: a
fresh clone stays a fresh clone. pytest-xdist's workers and every subprocess
inherit it through `JAX_COMPILATION_CACHE_DIR`. A cache the caller set already
is used as it is and left alone.
"""

import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)

_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # an xdist worker (the run's folder, inherited) or the caller's own
    path = tempfile.mkdtemp(prefix="jaxflow-test-xla-cache-")
    config.stash[_CACHE] = path
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    jax.config.update("jax_compilation_cache_dir", path)


def pytest_unconfigure(config):
    path = config.stash.get(_CACHE, None)
    if path is not None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # pytest-xdist's worksteal gives each worker a contiguous share of the items
    # and an idle worker steals from the tail of another's share: the example and
    # benchmark runs (marked slow, a minute or more each) go first, so that none of
    # them starts last and leaves one core idle while it finishes. The sort is
    # stable: the order within each group, and so module fixtures' reuse, stays.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
