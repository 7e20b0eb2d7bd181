"""`benchmarks/instability_grid.py` on a 9 x 9 grid: every route runs, agrees with
the tight reference, and the JSON carries the timing, cores-busy, accuracy and
flop-limit figures the results table reads. PyTorch routes run eagerly
(`--no-compile`: torch.compile alone would take minutes on 2 cores), and the
matmul peak of the flop limit is measured at 512^2 (2048^2: seconds of float64
matmuls that check nothing more)."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("scipy")

pytestmark = pytest.mark.slow  # a benchmark run end to end, in a subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "instability_grid.py"

JAXFLOW_ROUTES = {
    "jaxflow generate_with_jacobian, batch_map(256), one device": "G+J",
    "jaxflow generate_with_jacobian, one vmap": "G+J",
    "jaxflow jacfwd(generate), batch_map(256), one device": "G+J",
    "jaxflow generate_with_jacobian, batch_map, every device": "G+J",
    "jaxflow generate, batch_map(256), one device": "G",
}
for _where in ("one device", "every device"):
    for _schedule in ("LaneRefill", "JointSteps"):
        JAXFLOW_ROUTES[f"jaxflow batch_generate(jacobian=True), {_schedule}, {_where}"] = "G+J"
        JAXFLOW_ROUTES[f"jaxflow batch_generate, {_schedule}, {_where}"] = "G"
SCIPY_ROUTES = {
    "scipy solve_ivp RK45 loop + forward differences": "G+J",
    "scipy solve_ivp RK45 loop, G alone": "G",
}
TORCH_ROUTES = {
    "torchdiffeq dopri5 variational, compiled rhs, batch-joint RMS norm": "G+J",
    "torchdiffeq dopri5 variational, compiled rhs, per-point norm": "G+J",
    "torchdiffeq dopri5 variational, eager rhs, batch-joint RMS norm": "G+J",
    "torch batch Dopri5 variational, compiled step, per-point step size": "G+J",
    "torchdiffeq dopri5 G alone, compiled velocity, batch-joint RMS norm": "G",
    "torchdiffeq dopri5 G alone, compiled velocity, per-point norm": "G",
    "torch batch Dopri5 G alone, compiled step, per-point step size": "G",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("instability_grid") / "results.json"
    command = [sys.executable, str(SCRIPT), "--grid", "9", "--ref-points", "20"]
    command += ["--scipy-points", "3", "--repeats", "1", "--no-compile", "--peak-size", "512"]
    command += ["--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| route |" in done.stdout
    with open(out) as f:
        return json.load(f)


def check_route(route, kind):
    assert route["kind"] == kind
    assert route["points_per_s"] > 0 and route["run_s"] > 0 and route["cores_busy"] > 0
    assert 0 <= route["G_err_median"] <= route["G_err_max"] < 1e-4
    if kind == "G+J":
        assert math.isfinite(route["J_rel_err_max"]) and route["J_rel_err_median"] < 1e-3
    else:
        assert "J_rel_err_max" not in route
    assert route["fraction_of_limit"] > 0
    assert route["x_from_limit"] == pytest.approx(1 / route["fraction_of_limit"])


@pytest.mark.timeout(300)  # about 5x its idle time on 2 cores
def test_jaxflow_and_scipy_routes(results):
    assert results["points"] == 81 and results["rtol"] == 1e-6 and results["atol"] == 1e-8
    assert results["reference"]["points"] == 20
    assert results["reference"]["max_abs_diff_G_vs_DOP853_1e13"] < 1e-9
    for name, kind in {**JAXFLOW_ROUTES, **SCIPY_ROUTES}.items():
        check_route(results["routes"][name], kind)
        if name in JAXFLOW_ROUTES:
            assert results["routes"][name]["compile_s"] > 0
    # the variational route's Jacobian meets the tolerance (jacfwd through the
    # adaptive solver need not, and forward differences are only as good as h)
    routes = results["routes"]
    best = routes["jaxflow generate_with_jacobian, batch_map(256), one device"]
    assert best["J_rel_err_max"] < 1e-4
    # lane refill takes each point through its own solve's steps, on any device
    for where in ("one device", "every device"):
        refill = routes[f"jaxflow batch_generate(jacobian=True), LaneRefill, {where}"]
        for key in ("G_err_max", "J_rel_err_max"):
            assert refill[key] == pytest.approx(best[key], rel=1e-6, abs=1e-15)
    assert results["cpu_devices"] == results["cpu_count"]
    limit = results["flop_limit"]
    assert limit["peak_gflops"] > 0
    for part in ("variational", "velocity"):
        assert limit[part]["flops_per_eval"] > 0
        assert limit[part]["steps_max"] >= limit[part]["steps_median"] > 0
        assert limit[part]["evals_mean"] == pytest.approx(6 * limit[part]["steps_mean"] + 1)
        assert limit[part]["limit_points_per_s"] > 0
    assert limit["variational"]["flops_per_eval"] > limit["velocity"]["flops_per_eval"]


@pytest.mark.timeout(300)  # the module's benchmark run may fall to this test
def test_torch_routes(results):
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    assert results["torch"]["available"] and not results["torch"]["torch_compile"]
    assert results["torch"]["Dv_closed_form_vs_jacrev_max"] < 1e-10
    for name, kind in TORCH_ROUTES.items():
        route = results["routes"][name]
        check_route(route, kind)
        assert route["J_rel_err_max"] < 1e-4 if kind == "G+J" else True
        assert not route["torch_compile"]
