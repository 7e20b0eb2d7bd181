"""`benchmarks/lyapunov.py` at a toy size: every route (jaxflow, the numpy
baselines and, with torch installed, the PyTorch ones) is in the JSON with its
time, cores busy, accuracy and time over the flop limit, and PyTorch's Tsit5 / EM
spectra agree with jaxflow's (the same discrete maps, so to rounding over so
few steps)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a benchmark run end to end, in a subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lyapunov.py"


def check_route(route, limit_s):
    assert route["run_s"] > 0 and route["cores_busy"] > 0
    assert route["x_flop_limit"] >= 1
    assert route["x_flop_limit"] == pytest.approx(route["run_s"] / limit_s)


@pytest.mark.timeout(120)  # about 5x its idle time on 2 cores
def test_lyapunov_benchmark_small(tmp_path):
    out = tmp_path / "lyapunov.json"
    command = [sys.executable, str(SCRIPT), "--ics", "4", "--loop-ics", "1", "--paths", "8"]
    command += ["--steps-scale", "0.05", "--peak-size", "512", "--no-compile"]
    command += ["--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out) as f:
        res = json.load(f)
    assert res["peak"]["gflops"] > 0

    lorenz, moons = res["lorenz"], res["moons"]
    assert lorenz["ics"] == 4 and lorenz["steps"] == 500 and lorenz["transient_steps"] == 50
    assert moons["paths"] == 8 and moons["steps"] == 50
    for work in (lorenz, moons):
        limit = work["flop_limit"]
        assert limit["flops_per_step"] > limit["xla_flops_step"] > 0
        assert limit["limit_s"] == pytest.approx(
            limit["total_flops"] / (res["peak"]["gflops"] * 1e9)
        )

    assert {"jaxflow", "numpy_loop", "numpy_batched"} <= set(lorenz["routes"])
    assert {"jaxflow", "numpy_batched_fd"} <= set(moons["routes"])
    for name in ("jaxflow", "numpy_loop", "numpy_batched"):
        r = lorenz["routes"][name]
        check_route(r, lorenz["flop_limit"]["limit_s"])
        assert len(r["mean_exponents"]) == 3 and r["mean_vs_reference_max"] >= 0
    # numpy integrates with RK4, not jaxflow's Tsit5: close, not equal
    assert lorenz["routes"]["numpy_batched"]["vs_jaxflow_per_ic_max"] < 1e-2
    assert lorenz["routes"]["jaxflow"]["vs_jaxflow_per_ic_max"] == 0
    # spread over every CPU device (one a core), each IC's spectrum is the same
    assert res["environment"]["cpu_devices"] == os.cpu_count()
    check_route(lorenz["routes"]["jaxflow_every_device"], lorenz["flop_limit"]["limit_s"])
    check_route(moons["routes"]["jaxflow_every_device"], moons["flop_limit"]["limit_s"])
    assert lorenz["routes"]["jaxflow_every_device"]["vs_jaxflow_per_ic_max"] < 1e-12
    assert moons["routes"]["jaxflow_every_device"]["vs_jaxflow_per_path_max"] < 1e-12
    for name in ("jaxflow", "numpy_batched_fd"):
        check_route(moons["routes"][name], moons["flop_limit"]["limit_s"])
    # central differences against exact JVPs
    assert moons["routes"]["numpy_batched_fd"]["vs_jaxflow_per_path_max"] < 1e-6

    pytest.importorskip("torch")
    assert res["torch"]["available"] and res["torch"]["torch_compile"] is False
    for work, gap in ((lorenz, "vs_jaxflow_per_ic_max"), (moons, "vs_jaxflow_per_path_max")):
        r = work["routes"]["torch_eager"]
        check_route(r, work["flop_limit"]["limit_s"])
        # the same discrete map as jaxflow's (Tsit5's tableau; EM with exact JVPs)
        assert r[gap] < 1e-8
        assert work["best_torch"] == "torch_eager"
        assert "torch_compiled" not in work["routes"]  # --no-compile
