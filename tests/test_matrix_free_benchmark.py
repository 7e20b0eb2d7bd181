"""`benchmarks/matrix_free.py` at a toy size: both routes (jaxflow's block Lanczos,
the hand-written PyTorch Golub-Kahan-Lanczos) find the same top-k of the same
generation map as the dense SVD, and the JSON carries every figure the results
table reads."""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # a benchmark run end to end, in a subprocess

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "matrix_free.py"


@pytest.mark.timeout(120)  # about 5x its idle time on 2 cores
def test_matrix_free_benchmark_small(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(SCRIPT), "--sizes", "48", "--components", "6"]
    command += ["--steps", "8", "-k", "3", "--block-size", "4", "--repeats", "1"]
    command += ["--check-n", "48", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "n = 48, jaxflow: G" in done.stdout  # printed before the torch route runs
    with open(out) as f:
        res = json.load(f)
    assert res["check"]["n"] == 48
    assert res["check"]["jaxflow_vs_dense"] < 1e-3 and res["check"]["torch_vs_dense"] < 1e-3
    (row,) = res["sizes"]
    assert row["n"] == 48 and len(row["values"]) == 3
    assert row["values_vs_torch"] < 1e-3 and row["G_vs_torch"] < 1e-5
    assert row["jaxflow"]["converged"] and row["top_in_G"] > 0 and row["speedup_vs_torch"] > 0
    assert row["dense"]["total_s"] > 0
