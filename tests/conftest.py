"""Identity tests run in float64; float32 behaviour is tested with explicit dtypes.

The suite compiles with XLA:CPU's classic loop-fusion emitters and LLVM at
optimisation level 1 (`_COMPILE_FAST`, put before any XLA_FLAGS of the caller's,
which so win): most of a test's time is XLA compiling its programs, and these two
cut a test's compile time by about a third and the suite's CPU time by about a
quarter, while the few tests that run long (the digits UNet's examples) ran no
slower. Neither flag changes floating-point semantics (no fast-math). The
subprocesses that tests start inherit them through the environment.

Tried and left out: a persistent XLA compilation cache shared by the run's
processes. The two API tours, which compile mostly the same programs in two
subprocesses, were no faster with it: JAX never writes a program with a
host callback to that cache, and most of jaxflow's carry `eqx.error_if`'s.
"""

import faulthandler
import os
import sys

_COMPILE_FAST = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"
# before JAX starts its backend, which reads XLA_FLAGS once
os.environ["XLA_FLAGS"] = f"{_COMPILE_FAST} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

_STDERR = pytest.StashKey[int]()


def pytest_configure(config):
    config.stash[_STDERR] = os.dup(sys.stderr.fileno())


def pytest_unconfigure(config):
    os.close(config.stash[_STDERR])


def pytest_collection_modifyitems(config, items):
    # pytest-xdist's worksteal gives each worker a contiguous share of the items
    # and an idle worker steals from the tail of another's share: the example and
    # benchmark runs (marked slow, a minute or more each) go first, so that none of
    # them starts last and leaves one core idle while it finishes. The sort is
    # stable: the order within each group, and so module fixtures' reuse, stays.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _time_limit(item) -> float:
    """pytest-timeout's limit for `item`: its marker, else --timeout, else the ini's."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        return float(marker.kwargs.get("timeout", marker.args[0] if marker.args else 0) or 0)
    return float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # pytest-timeout ends a stuck test (a deadlock in native code too), but under
    # pytest-xdist the stacks it prints go to the worker's captured output and are
    # lost with the worker; faulthandler writes every thread's stack to the real
    # stderr a second before, so that CI's log shows where the test was stuck
    limit = _time_limit(item) if item.config.pluginmanager.hasplugin("timeout") else 0
    if limit <= 0:
        return (yield)
    faulthandler.dump_traceback_later(max(limit - 1, 0.5), file=item.config.stash[_STDERR])
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
