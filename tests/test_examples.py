"""Run every example with --quick and check the numbers it records."""

import json
import os
import subprocess
import sys

import numpy as np
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


@pytest.mark.slow
def test_reconstruction_vs_instability(tmp_path):
    res = run_example("reconstruction_vs_instability", tmp_path)["results"]
    for solver in ("euler", "heun"):
        d = res["per_solver"][solver]
        for key in ("R_vs_E_perturbation", "R_vs_E_exact"):
            for stat in ("pearson", "spearman"):
                s = d["correlations_of_logs"][key][stat]
                # positive, significant, and the bootstrap interval excludes zero
                assert s["r"] > 0.2 and s["p_value"] < 1e-3 and s["bootstrap_95"][0] > 0, (
                    solver,
                    key,
                    stat,
                    s,
                )
        # unstable points reconstruct worse than stable ones
        assert d["median_R_where_E_gt_1"] > d["median_R_where_E_le_1"]
        # the paper's perturbation estimate tracks the exact coefficient
        assert d["E_perturbation_vs_exact_median_rel_diff"] < 0.1
    # a second-order solver reconstructs better at the same step count
    assert res["per_solver"]["heun"]["median_R"] < res["per_solver"]["euler"]["median_R"]


@pytest.mark.timeout(420)  # about 5x its idle time on 2 cores
@pytest.mark.slow
def test_instability_vs_dimension(tmp_path):
    rec = run_example("instability_vs_dimension", tmp_path)
    res = rec["results"]
    dims = rec["settings"]["dims"]
    assert dims == sorted(dims) and len(dims) >= 3
    for row in res["sweep"]:
        # Theorem 4.1 at every n and M, eps and delta from the same samples
        assert all(p >= b - 1e-12 for p, b in zip(row["P_M"], row["bound"], strict=True))
        assert abs(row["own_box_mass"] - rec["settings"]["law"]["own_box_mass"]) < 1e-6
    assert res["bound_respected_everywhere"]
    # P_M rises with n, to (nearly) one
    assert all(res["P_M_non_decreasing_in_n"])
    first, last = res["sweep"][0], res["sweep"][-1]
    assert all(b > a for a, b in zip(first["P_M"], last["P_M"], strict=True))
    assert last["P_M"][0] >= 0.9
    # Theorem 4.3's eps -> 0 holds; the widths shrink with n (Assumption 4.4.4)
    assert all(e == 0 for e in last["eps"])
    assert all(
        b["width"] < a["width"] for a, b in zip(res["sweep"], res["sweep"][1:], strict=False)
    )
    # Ebar's change of variables agrees with the divergence integral along the inversion
    for row in res["dense_check"]:
        assert row["max_abs_diff_divergence_vs_density"] < 1e-5
        assert row["max_abs_diff_divergence_vs_sweep"] < 1e-2 * row["n"]
    assert res["tolerance_check"]
    for row in res["tolerance_check"]:
        assert row["same_side_of_every_M"] and row["max_rel_diff"] < 1e-2
    # the control law, where delta is small, makes the bound informative
    assert any(c["bound"][0] > 0.2 for c in res["control"])


@pytest.mark.slow
def test_error_amplification(tmp_path):
    res = run_example("error_amplification", tmp_path)["results"]
    assert res["all_checks_pass"]
    for row in res["by_step"]:
        c = row["checks"]
        assert c["inverted_error_within_euler_bound"] and c["gronwall_log_C_le_L"]
        assert c["U_ge_eq5"] and c["precise_error_le_U"]
        # error = C |zhat - z| to first order, for the typical point
        assert abs(row["median_ratio_error_over_C_times_inverted_error"] - 1) < 0.05
        assert row["fraction_C_gt_1"] > 0.05  # some points are amplified
    # Euler's inverted-noise error is first order in h
    assert 0.8 < res["fitted_order_inverted_noise_error"] < 1.2


def test_correlation_statistics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import _stats
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(300)
    y = 0.3 * x + rng.standard_normal(300)
    y[:20] = np.round(y[:20])  # ties for the ranks
    x[10:30] = 1.0
    np.testing.assert_allclose(_stats.ranks(x), stats.rankdata(x))
    np.testing.assert_allclose(_stats.pearson(x, y), stats.pearsonr(x, y)[0], rtol=1e-12)
    np.testing.assert_allclose(_stats.spearman(x, y), stats.spearmanr(x, y)[0], rtol=1e-12)
    # Fisher-z p-value against the exact t-based one: same order of magnitude at n = 300
    r = _stats.pearson(x, y)
    exact = stats.pearsonr(x, y)[1]
    assert 1e-12 < exact < 1e-3
    assert abs(np.log10(_stats.fisher_p_value(r, 300)) - np.log10(exact)) < 0.2
    lo, hi = _stats.bootstrap_interval(_stats.pearson, x, y, rng, 500)
    assert lo < r < hi


@pytest.mark.slow
def test_moons_lyapunov(tmp_path):
    """Paper 003: samples land on the moons, and the leading Lyapunov vector there
    is orthogonal to the score (Def. 4.2) and tangent to the curve."""
    res = run_example("moons_lyapunov", tmp_path)["results"]
    assert res["median_distance_to_support"] < 0.05
    assert res["median_alignment_score_q1"] < 0.1 and res["fraction_alignment_q1_below_0_1"] > 0.8
    assert res["median_alignment_score_q2"] > 0.9
    assert res["median_tangent_alignment_q1"] > 0.95
    # score-based generation is stable along almost every path (paper 003 G.5)
    assert res["fraction_lambda1_positive"] < 0.05 and res["median_exponents"][0] < 0


@pytest.mark.slow
def test_moons_score_error(tmp_path):
    """Paper 003 section 3: score errors move samples along the moons (large
    displacements) while the mass off the moons stays near zero; the same
    displacements in random directions would leave the support."""
    res = run_example("moons_score_error", tmp_path)["results"]
    for name in ("smooth", "random"):
        sde = res["per_chi"][f"sde_{name}"]
        assert sde[0]["eps"] == 0 and sde[0]["median_displacement"] == 0
        for row in sde:
            assert row["fraction_beyond"]["0.1"] <= 0.02, (name, row)
        last = sde[-1]
        assert last["eps"] >= 4 and last["median_displacement"] > 0.2
        assert last["position_w1_to_unperturbed"] > 0.05  # the law moves along the moons
        assert last["control_fraction_beyond"]["0.1"] > 0.3
        ode = {row["eps"]: row for row in res["per_chi"][f"ode_{name}"]}
        assert ode[1.0]["fraction_beyond"]["0.1"] <= 0.05 and ode[1.0]["median_displacement"] > 0.2


@pytest.mark.timeout(120)  # about 5x its idle time on 2 cores
@pytest.mark.slow
def test_ou_memorisation(tmp_path):
    """Paper 002: Prop. 4.3 to rounding; Theorem 2's law passes the z-tests for the
    exact DDPM sampler; samples end on training points as the steps grow."""
    res = run_example("ou_memorisation", tmp_path)["results"]
    assert res["prop_4_3_max_relative_gap"] < 1e-10
    for row in res["theorem_2"]:
        assert row["ddpm"]["p_value"] > 1e-3, row
        # Euler-Maruyama is tested against its own scheme's exact law, whose
        # variance is off eq. 4.12 by an O(h) bias, largest near the data end
        assert row["euler_maruyama"]["p_value"] > 1e-4, row
        assert abs(row["euler_maruyama_scheme_var_bias"]) < 0.1
    assert res["theorem_2"][-1]["euler_maruyama_scheme_var_bias"] > 0.01
    mem = res["memorisation"]
    exact = mem["exact_law_median_distance"]
    for n, per in mem["per_N"].items():
        for sampler in ("sde", "ddpm", "ode"):
            runs = per["runs"][sampler]
            # with enough steps the median distance is the exact law's, far below the
            # spacing of the training points
            assert runs[-1]["median_distance"] < 1.5 * exact, (n, sampler, runs)
            assert runs[-1]["median_distance"] < 0.2 * per["median_training_spacing"]
            assert runs[-1]["median_distance_after_final_denoise"] < 1e-6
        assert per["runs"]["ode"][0]["median_distance"] > per["runs"]["ode"][-1]["median_distance"]


@pytest.mark.timeout(210)  # about 5x its idle time on 2 cores
@pytest.mark.slow
def test_moons_flow_matching(tmp_path):
    """Paper 003 G.5 at toy size: four models train, the flow models from eight
    Gaussians (the OT coupling lowers the flow-matching loss, as straighter
    pairings should), generate, and give finite spectra and alignments; trained
    weights are cached under names that say the source."""
    rec = run_example("moons_flow_matching", tmp_path)
    res = rec["results"]
    models = res["per_model"]
    assert set(models) == {"cfm", "ot_cfm", "si", "sgm"}
    assert rec["settings"]["source"] == {"flow_models": "eight_gaussians", "sgm": "normal"}
    assert models["ot_cfm"]["final_loss"] < 0.5 * models["cfm"]["final_loss"]
    for m in models.values():
        assert np.isfinite(m["final_loss"])
        for row in m["eps"].values():
            assert 0 <= row["fraction_beyond_0_1"] <= 1
        base = m["eps"]["0.0"]
        assert 0 <= base["median_alignment_score_q1"] <= 1
        assert all(np.isfinite(base["median_exponents"]))
    assert sorted(res["ranking_by_robustness"]) == sorted(models)
    expected = [f"moons_{m}_8g_200_64x2_seed0" for m in ("cfm", "ot_cfm", "si")]
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        expected + ["moons_sgm_normal_200_64x2_seed0"]
    )


@pytest.mark.timeout(300)  # about 5x its idle time on 2 cores
@pytest.mark.slow
def test_digits_lyapunov_and_reconstruction_share_one_trained_model(tmp_path):
    """Paper 003 Fig. 2/5 and paper 000 Fig. 4(b) on the digits at toy size: the
    full spectrum (n = 64) sums to the log-determinant of the composed DDPM map,
    the intrinsic-dimension estimates are those of the real digits, and the
    second script reuses the first one's cached weights."""
    rec = run_example("digits_lyapunov", tmp_path)
    res = rec["results"]
    assert len(res["exponents_mean"]) == 64 and all(np.isfinite(res["exponents_mean"]))
    assert res["training"]["final_loss"] is not None
    np.testing.assert_allclose(
        res["sum_of_exponents_times_steps_sample_0"],
        res["log_abs_det_jacobian_sample_0"],
        rtol=1e-3,
    )
    assert 1 <= res["gap_index"] <= 63
    # the 1797 real digits: PCA needs 21 components for 90% of the variance; the
    # Levina-Bickel estimate (k = 10) is 7.4
    assert res["pca_dimension_90"] == 21 and res["pca_dimension_95"] == 29
    assert 6 < res["intrinsic_dimension_mle"]["10"] < 9
    assert len(res["nearest_training_distance_moved_median"]) == 64
    # the vectors are an orthonormal basis: the score's squared components sum to 1
    np.testing.assert_allclose(res["score_share_in_leading_k_median"][-1], 1.0, rtol=1e-4)

    rec = run_example("digits_reconstruction", tmp_path)
    res = rec["results"]
    assert res["training"]["final_loss"] is None  # loaded from the cache
    assert os.listdir(tmp_path / "cache") == ["digits_unet8_60_seed0"]
    r, e = np.asarray(res["R"]), np.asarray(res["E_jvp"])
    assert r.shape == (8,) and np.all(r > 0) and np.all(e > 0)
    # the paper's finite-difference estimate approximates the JVP
    assert res["fd_vs_jvp_median_rel_diff"] < 0.1


@pytest.mark.timeout(720)  # about 5x its idle time on 2 cores
@pytest.mark.slow
def test_digits_singular_values(tmp_path):
    """The digits UNet's J_G at n = 64: matrix-free top-k equals the dense spectrum,
    the smallest (through the inverse map) are the solved inverse's and their
    certificate against G fails, as it must for Euler's inversion of Euler's
    generation, and the sum of log singular values is the Lyapunov exponents' sum
    times the span; at 16x16 the matrix-free top-k is positive, descending and
    converged."""
    res = run_example("digits_singular_values", tmp_path)["results"]
    for row in res["n64"]:
        s = np.asarray(row["singular_values_dense"])
        k = len(row["top_k"])
        np.testing.assert_allclose(row["top_k"], s[:k], rtol=1e-5)
        assert all(row["top_k_converged"])
        # the route computes the top of the solved inverse's Jacobian at G(z): equal
        # to its dense spectrum; the quick run's Euler inversion (12 steps) is far
        # from inverting Euler generation, so near dense J_G's smallest only to the
        # reconstruction's accuracy, and the certificate says so: not converged, with
        # the mismatch |J_G v_i| / s_i - 1 that the dense J_G measures too
        small = np.asarray(row["smallest"])
        np.testing.assert_allclose(small, row["smallest_dense_inverse"], rtol=1e-6)
        np.testing.assert_allclose(small, s[::-1][: len(small)], rtol=0.7)
        forward = np.abs(np.asarray(row["smallest_dense_forward"]) / small - 1)
        np.testing.assert_allclose(row["smallest_forward_errors"], forward, rtol=1e-6)
        assert max(forward) > 1e-2 and row["smallest_round_trip_error"] > 1e-2
        assert not any(row["smallest_converged"])
        np.testing.assert_allclose(row["sum_log_s"], row["sum_lyapunov_times_T"], atol=1e-6)
        np.testing.assert_allclose(row["sum_log_s"], row["log_abs_det_dense"], atol=1e-6)
    for point in res["larger"]["16"]["points"]:
        v = np.asarray(point["values"])
        assert np.all(v > 0) and np.all(np.diff(v) <= 0)
        assert all(point["converged"]) and max(point["relative_residuals"]) < 1e-3
        np.testing.assert_allclose(v, point["dense_top"], rtol=1e-3)
