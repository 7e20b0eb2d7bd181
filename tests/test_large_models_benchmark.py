"""`benchmarks/large_models.py --tiny`: the SD3.5 / FLUX benchmark's code path end to
end on the CPU (tiny configs, one size, float32), its worker processes and its
JSON: every case present, positive timings, the JVP/forward ratio, and jaxflow's
velocity and JVP within 1e-4 of diffusers'. `--tiny --study`: the large-model
study's cost per image, jaxflow's exact route against the paper's PyTorch route,
which must compute the same regeneration and the same instability."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow  # a benchmark run end to end, in a subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "large_models.py"
MODELS = ("sd35-medium", "flux-dev")


def run(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--models", ",".join(MODELS)]
    command += ["--sizes", "128", "--dtypes", "float32", "--repeats", "1"]
    command += ["--timeout", "300", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out) as f:
        return json.load(f), done.stdout


@pytest.mark.timeout(210)  # about 5x its idle time on 2 cores
def test_tiny_benchmark(tmp_path):
    """One test, so that pytest-xdist runs the benchmark once (a fixture would run
    on each worker that takes one of several tests)."""
    results, stdout = run(tmp_path)
    _every_case_is_present_and_timed(results)
    _jaxflow_matches_diffusers_in_float32(results)
    _prints_the_markdown_tables(stdout)


def _every_case_is_present_and_timed(results):
    assert results["tiny"] and results["devices"]
    cases = {(c["model"], c["size"], c["dtype"], c["framework"]): c for c in results["cases"]}
    assert set(cases) == {
        (m, 128, "float32", fw) for m in MODELS for fw in ("jaxflow", "diffusers")
    }
    for key, case in cases.items():
        errors = {k: v for k, v in case.items() if k.endswith("error")}
        assert not errors, (key, errors)
        assert case["params"] > 0 and case["forward_peak_gb"] > 0 and case["jvp_peak_gb"] > 0
        assert case["forward_ms"] > 0 and case["jvp_ms"] > 0
    for model in MODELS:
        jax_case = cases[(model, 128, "float32", "jaxflow")]
        assert jax_case["forward_compile_s"] > 0 and jax_case["jvp_compile_s"] > 0
        assert jax_case["jvp_over_forward"] == pytest.approx(
            jax_case["jvp_ms"] / jax_case["forward_ms"]
        )
        torch_case = cases[(model, 128, "float32", "diffusers")]
        # torch.func.jvp ran under the math SDPA kernel
        assert torch_case["forward_math_ms"] > 0 and torch_case["jvp_over_forward_math"] > 0
        assert torch_case["jvp_primal_vs_forward"] < 1e-5


def _jaxflow_matches_diffusers_in_float32(results):
    for case in results["cases"]:
        if case["framework"] == "jaxflow":
            assert case["forward_max_rel_diff"] < 1e-4, case
            assert case["jvp_max_rel_diff"] < 1e-4, case
            assert case["jvp_primal_max_rel_diff"] < 1e-4, case


def _prints_the_markdown_tables(stdout):
    assert "| model | size | dtype | framework | compile s (fwd / JVP) |" in stdout
    for model in MODELS:
        assert f"| {model} | 128^2 | float32 | jaxflow |" in stdout
        assert f"| {model} | 128^2 | float32 | diffusers (math SDPA) |" in stdout
    assert "jaxflow fwd / diffusers fwd (default SDPA)" in stdout


# ---- --study: the cost per image of the large-model study


def run_study(tmp_path):
    out = tmp_path / "study.json"
    command = [sys.executable, str(SCRIPT), "--tiny", "--study", "--models", "sd35-medium"]
    command += ["--sizes", "128", "--dtypes", "float32", "--repeats", "1", "--study-steps", "4"]
    command += ["--timeout", "300", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out) as f:
        return json.load(f), done.stdout


@pytest.mark.timeout(240)  # about 5x its idle time on 2 cores
def test_tiny_study(tmp_path):
    """One test for the study run (its own pytest-xdist worker, as the one above)."""
    results, stdout = run_study(tmp_path)
    cases = {(c["model"], c["size"], c["dtype"], c["framework"]): c for c in results["cases"]}
    assert set(cases) == {("sd35-medium", 128, "float32", fw) for fw in ("jaxflow", "diffusers")}
    for key, case in cases.items():
        errors = {k: v for k, v in case.items() if k.endswith("error")}
        assert not errors, (key, errors)
        assert case["mode"] == "study" and case["steps"] == [4]
    jax_case = cases[("sd35-medium", 128, "float32", "jaxflow")]
    torch_case = cases[("sd35-medium", 128, "float32", "diffusers")]
    for stage in ("invert_regenerate", "jvp", "fd_regenerate", "topk"):
        assert jax_case[f"{stage}_ms"] > 0 and jax_case[f"{stage}_compile_s"] > 0
    for stage in ("invert_regenerate", "fd_regenerate"):
        assert torch_case[f"{stage}_ms"] > 0
    assert len(jax_case["exponents"]) == 4

    # the two routes compute the same thing: the inversion and the regeneration
    # agree in float32, and the exact E (one JVP) is the finite difference's
    assert jax_case["invert_max_rel_diff"] < 1e-4
    assert jax_case["regenerate_max_rel_diff"] < 1e-4
    assert jax_case["E_fd_torch"] == pytest.approx(torch_case["E_fd"])
    assert jax_case["E_fd_torch"] == pytest.approx(jax_case["E_jvp"], rel=0.03)
    assert jax_case["E_fd"] == pytest.approx(jax_case["E_jvp"], rel=0.03)

    # the per-image routes are sums of the stages, their ratio theirs, and the
    # estimates linear in the steps (one step count)
    (row,) = results["study"]["summary"]
    exact = jax_case["invert_regenerate_ms"] + jax_case["jvp_ms"]
    paper = torch_case["invert_regenerate_ms"] + torch_case["fd_regenerate_ms"]
    whole = exact + jax_case["fd_regenerate_ms"] + jax_case["topk_ms"]
    assert row["jaxflow_exact_route_ms"] == pytest.approx(exact)
    assert row["torch_paper_route_ms"] == pytest.approx(paper)
    assert row["jaxflow_whole_study_ms"] == pytest.approx(whole)
    assert row["jaxflow_topk_ms"] == pytest.approx(jax_case["topk_ms"])
    assert row["exact_over_paper"] == pytest.approx(exact / paper)
    assert row["exact_over_paper_500_steps"] == pytest.approx(exact / paper)
    assert row["goal_met"] == (exact / paper <= 1.5)
    assert row["extrapolation"] == "linear"
    assert row["torch_paper_route_100_images_h"] == pytest.approx(paper / 4 * 500 * 100 / 3.6e6)
    assert row["jaxflow_exact_route_100_images_h"] == pytest.approx(exact / 4 * 500 * 100 / 3.6e6)

    assert "| jaxflow exact route ms (inv + regen + JVP) |" in stdout
    assert "| sd35-medium | 128^2 | float32 | 4 | jaxflow |" in stdout
    assert "| sd35-medium | 128^2 | float32 | 4 | diffusers |" in stdout
    assert "extrapolated" in stdout


def test_study_extrapolation():
    """Several step counts: the fitted line separates a solve's fixed cost (jaxflow's
    extra start evaluation) from the per-step cost; one step count: linear."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("large_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    at_500, per_step, how = module._extrapolate({2: 10.0 + 2 * 3.0, 4: 10.0 + 4 * 3.0})
    assert how == "affine" and per_step == pytest.approx(3.0)
    assert at_500 == pytest.approx(10.0 + 500 * 3.0)
    at_500, per_step, how = module._extrapolate({4: 22.0})
    assert how == "linear" and per_step == pytest.approx(22.0 / 4)
    assert at_500 == pytest.approx(22.0 / 4 * 500)
    # noise that makes the fitted slope non-positive: back to linear, from the largest S
    assert module._extrapolate({2: 30.0, 4: 20.0})[2] == "linear"
