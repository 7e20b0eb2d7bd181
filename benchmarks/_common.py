"""What the benchmarks share: the CPU's device count, cores busy, the machine's
matmul peak and XLA's flop count."""

import os
import resource
import sys
import time

import jax
import jax.numpy as jnp


def cpu_devices_flag() -> int:
    """`--cpu-devices N` from the command line, read before anything runs (the
    CPU's device count is fixed when JAX starts; argparse sees the flag again
    later); one per core by default."""
    for i, arg in enumerate(sys.argv):
        if arg == "--cpu-devices" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--cpu-devices="):
            return int(arg.split("=", 1)[1])
    return os.cpu_count() or 1


def cpu_seconds() -> float:
    """The process's CPU time, user and system, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_gflops(dtype=jnp.float64, size=2048, repeats=5) -> float:
    """Best GFLOP/s of a `size x size` matmul (2 size^3 flops) in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def xla_cost(fn, *args) -> dict:
    """XLA's cost analysis of `jax.jit(fn)(*args)` (flops, transcendentals, ...)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return dict(cost)
