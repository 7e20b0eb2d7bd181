"""`benchmarks/large_models.py --tiny`: the SD3.5 / FLUX benchmark's code path end to
end on the CPU (tiny configs, one size, float32), its worker processes and its
JSON: every case present, positive timings, the JVP/forward ratio, and jaxflow's
velocity and JVP within 1e-4 of diffusers'."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

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
