"""Run every example with --quick and check the numbers it records."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, tmp_path, *extra):
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", f"{name}.py"),
            "--quick",
            "--out",
            str(tmp_path),
            *extra,
        ],
        check=True,
        cwd=ROOT,
    )
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    with open(tmp_path / f"{name}.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_instability_map(tmp_path):
    rec = run_example("instability_map", tmp_path)
    res = rec["results"]
    assert rec["settings"]["grid"] == 41 and rec["settings"]["rtol"] <= 1e-6
    mask = [[c == "1" for c in row] for row in res["E_y_gt_1_mask_rows_along_y"]]
    grid = len(mask)
    # the central band (around the dashed line through the ridge on z1 = 0) is unstable ...
    axis = res["axis"]
    iy = min(range(grid), key=lambda i: abs(axis[i] - res["dashed_line_y"]))
    assert any(mask[i][grid // 2] for i in range(max(iy - 1, 0), min(iy + 2, grid)))
    assert res["E_y_exact_max"] > 10
    # ... and the corners, deep in the modes' basins, contract
    assert all(v < 1 for v in res["E_y_at_corners"].values())
    for name in ("n_x", "n_y"):
        assert res["panel_c"][name]["bound_respected_where_condition_holds"]
