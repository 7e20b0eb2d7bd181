"""`examples/large_model_reconstruction.py --quick` on the tiny SD3.5-like pipeline:
the records, resuming, refusing a changed study, and the same records sharded over
four (virtual CPU) devices. The two runs that compute run one after the other in
one subprocess with four virtual CPU devices (JAX's device count is fixed when it
starts; this process has one): the single-device run on the first device
(`--devices 1`), then the sharded one, which saves an interpreter, JAX, torch and
pipeline start-up. The resumed and the refused runs compute and compile nothing:
they run in this process (`main(argv)`), which saves two more."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "large_model_reconstruction"


# `main` of each argv in turn, in one process; each run's printout after a marker
RUNS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from large_model_reconstruction import main
for argv in json.loads(sys.argv[2]):
    print("@@run", flush=True)
    main(argv)
"""


def run_both(single, sharded):
    """The single-device run (`single`) and the sharded run (`sharded`, without the
    singular values, whose reverse-mode compile would double it) in one process
    with four virtual CPU devices: (what the single run printed, the sharded's)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    argvs = [
        ["--quick", "--quiet", "--out", str(single), "--devices", "1"],
        ["--quick", "--quiet", "--out", str(sharded), "--singular-values", "0"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", RUNS, os.path.join(ROOT, "examples"), json.dumps(argvs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, printed_single, printed_sharded = done.stdout.split("@@run\n")
    return printed_single, printed_sharded


def example():
    """The example script as a module (its functions, without running it)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import large_model_reconstruction
    finally:
        sys.path.pop(0)
    return large_model_reconstruction


def run_here(out, *extra):
    """`main` of the example in this process: (what it printed, the SystemExit it
    raised or None)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from large_model_reconstruction import main
    finally:
        sys.path.pop(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            main(["--quick", "--quiet", "--out", str(out), *extra])
        except SystemExit as error:
            return printed.getvalue(), error
    return printed.getvalue(), None


def read(out):
    with open(out / f"{NAME}.json") as f:
        result = json.load(f)
    with open(out / f"{NAME}.jsonl") as f:
        lines = [json.loads(line) for line in f.read().splitlines()]
    return result, lines


@pytest.mark.timeout(480)  # about 5x its idle time on 2 cores
@pytest.mark.slow
def test_quick_study_resumes_and_shards(tmp_path):
    """One test, so that pytest-xdist runs the single-device study once: its
    records, then a resumed run, a refused changed study, and the sharded run
    against it."""
    out = tmp_path / "quick"
    printed_single, printed_sharded = run_both(out, tmp_path / "sharded")
    assert "batches of 1 on 1 device(s)" in printed_single
    quick = (out, *read(out))
    _quick_run_records_every_image(quick)
    _rerun_resumes_and_refuses_a_changed_study(quick, tmp_path)
    _sharded_run_gives_the_same_records(quick, tmp_path / "sharded", printed_sharded)


def _values(record):
    return [record["R"], record["E_jvp"], record["PSNR"], record["PSNR_vae_only"]]


def _quick_run_records_every_image(quick):
    out, result, lines = quick
    assert (out / f"{NAME}.png").stat().st_size > 10_000
    # a header with the settings, then one line per image
    header = lines[0]["header"]
    assert header["model"] == "sd3-tiny" and header["steps"] == 8 and header["top_k"] == 2
    records = lines[1:]
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3]
    res = result["results"]
    assert res["ok"] == 4 and not res["failed"] and res["computed_this_run"] == 4
    for r in records:
        assert r["ok"] and r["R"] > 0 and np.isfinite(r["PSNR"])
        # the paper's finite difference tracks the exact JVP on this smooth model
        assert abs(r["E_fd"] / r["E_jvp"] - 1) < 0.03
        assert len(r["exponents"]) == 2 and r["exponents"][0] >= r["exponents"][1]
        assert np.all(np.isfinite(r["exponents"]))
        # the top singular values of J_G (matrix-free): the largest bounds every
        # direction's amplification, the JVP's included
        s = r["singular_values"]
        assert len(s) == 2 and s[0] >= s[1] > 0 and r["singular_converged"]
        assert r["E_jvp"] <= s[0] * (1 + 1e-3)
        assert (out / f"{NAME}_images" / f"{r['index']:06d}.png").exists()
    for key in ("R_vs_E_jvp", "R_vs_E_fd"):
        stats = res["correlations_of_logs"][key]
        assert stats["n"] == 4
        for name in ("pearson", "spearman"):
            assert -1 <= stats[name]["r"] <= 1 and "bootstrap_95" in stats[name]
    assert res["E_fd_vs_E_jvp"]["max_rel_diff"] < 0.03
    assert res["E_jvp_below_s1"] and res["singular_converged"] == 4


def _rerun_resumes_and_refuses_a_changed_study(quick, tmp_path):
    out, result, lines = quick
    again = tmp_path / "again"
    shutil.copytree(out, again)
    printed, error = run_here(again)
    assert error is None
    assert "0 of 4 images to do (4 already recorded)" in printed
    rerun, rerun_lines = read(again)
    assert rerun["results"]["skipped_already_recorded"] == 4
    assert rerun["results"]["computed_this_run"] == 0
    assert rerun_lines == lines  # nothing appended, nothing rewritten
    assert rerun["results"]["per_image"] == result["results"]["per_image"]

    # a SystemExit with a message: the script exits with code 1, the message on stderr
    _, refused = run_here(again, "--steps", "9")
    assert isinstance(refused, SystemExit) and isinstance(refused.code, str)
    assert "steps: 8 there, 9 now" in refused.code and "new --out" in refused.code
    assert read(again)[1] == lines

    # the last record cut mid-line, as a kill during its write leaves it: the rerun
    # (of the three images before it, which computes nothing) cuts the fragment off
    # before appending anything, keeps it aside and says so
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    jsonl = cut / f"{NAME}.jsonl"
    whole = jsonl.read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    assert json.loads(last)["index"] == 3
    jsonl.write_bytes(whole[: len(whole) - len(last) // 2])
    with pytest.warns(UserWarning, match="ended in a partial record"):
        printed, error = run_here(cut, "--num-images", "3")
    assert error is None and "0 of 3 images to do (3 already recorded)" in printed
    assert read(cut)[1] == lines[:-1]  # every line whole again
    dropped = (cut / f"{NAME}.jsonl.dropped").read_bytes()
    assert dropped == last[: len(last) - len(last) // 2 + 1] + b"\n"


def _sharded_run_gives_the_same_records(quick, tmp_path, printed):
    _, _, lines = quick
    assert "batches of 4 on 4 device(s)" in printed
    result, sharded = read(tmp_path)
    assert result["settings"]["batch"] == 4
    single = {r["index"]: r for r in lines[1:]}
    assert sorted(r["index"] for r in sharded[1:]) == sorted(single)
    for r in sharded[1:]:
        s = single[r["index"]]
        assert r["id"] == s["id"] and r["ok"]
        np.testing.assert_allclose(_values(r), _values(s), rtol=1e-4)
        # the finite difference divides rounding by |n| = 1e-3 |z|
        np.testing.assert_allclose(r["E_fd"], s["E_fd"], rtol=1e-3)
        np.testing.assert_allclose(r["exponents"], s["exponents"], rtol=1e-4, atol=1e-6)
        assert "singular_values" not in r


STUDY = dict(model="sd3-tiny", size=64, steps=8, solver="euler", seed=0, num_images=4, quick=True)


def _entry(index):
    return dict(
        index=index,
        id=f"china.jpg#{index}",
        ok=True,
        errors={},
        R=0.0123 * (index + 1),
        PSNR=31.5,
        E_fd=1.25,
        E_jvp=1.2501,
        exponents=[0.01, -0.02],
        seconds=dict(encode=0.5, solves=3.25, batch_wall=4.5),
    )


def test_a_last_line_cut_at_any_byte_is_repaired_before_appending(tmp_path, monkeypatch):
    """A killed run's last line cut at every byte offset (of a record, and of the
    header when it is the only line): resuming cuts the fragment off, keeps it in
    `.dropped` and warns, so that the record appended next reads back; a whole
    record that lacks only its newline is kept; a whole file is left as it is."""
    lm = example()
    # about 3 ms a sync, three a cut, 450 cuts: durability is not what is tested here
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    jsonl = tmp_path / f"{NAME}.jsonl"
    dropped = tmp_path / f"{NAME}.jsonl.dropped"
    new = _entry(9)
    for records in ([], [_entry(0), _entry(1)]):
        jsonl.unlink(missing_ok=True)
        for entry in [{"header": STUDY}, *records]:
            lm.append(str(jsonl), entry)
        whole = jsonl.read_bytes()
        last = whole[whole.rstrip(b"\n").rfind(b"\n") + 1 :]  # with its newline
        before = whole[: len(whole) - len(last)]
        for k in range(len(last) + 1):
            jsonl.write_bytes(before + last[:k])
            dropped.unlink(missing_ok=True)
            partial = 0 < k < len(last) - 1  # len(last) - 1: a whole record, no newline
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                done = lm.open_store(str(tmp_path), str(jsonl), STUDY)
            expected = {r["index"]: r for r in records[: -1 if partial or k == 0 else None]}
            assert done == expected, k
            messages = [str(w.message) for w in caught]
            if partial:
                assert len(messages) == 1 and "ended in a partial record" in messages[0], k
                assert dropped.read_bytes() == last[:k] + b"\n", k
            else:
                assert not messages and not dropped.exists(), k
            lm.append(str(jsonl), new)
            lines = [json.loads(line) for line in jsonl.read_bytes().splitlines()]
            assert lines == [{"header": STUDY}, *expected.values(), new], k
            assert lm.read_records(str(tmp_path), STUDY) == {**expected, 9: new}, k


def test_lyapunov_step_map_is_the_generation_solvers_step(tmp_path):
    """The map whose exponents are reported, composed over the grid, is the solve."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import jaxflow as jf
    import jaxflow.diffusers as jfd

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from large_model_reconstruction import solver_step
    finally:
        sys.path.pop(0)
    jfd.tiny_pipeline("sd3").save_pretrained(tmp_path)
    model = jfd.load(tmp_path, prompt_cache=None)
    field = model.field("", height=64, width=64, max_sequence_length=16)
    times = model.times(4, height=64, width=64)
    z = jax.random.normal(jax.random.key(0), (16 * 8 * 8,), jnp.float32)
    for heun, solver in ((False, "euler"), (True, jfd.FlowMatchHeun())):

        @eqx.filter_jit
        def both(field, z, heun=heun, solver=solver):
            # the step index traced, as `lyapunov_spectrum_of_map` takes it: the loop
            # body holds the network once, not once a step (about half the compile)
            step = solver_step(field, times[::-1], heun)
            x = jax.lax.fori_loop(0, 4, lambda i, x: step(x, i), z)
            return x, jf.generate(field, z, solver=solver, times=times)

        x, reference = (np.asarray(a) for a in both(field, z))
        assert np.linalg.norm(x - reference) / np.linalg.norm(reference) < 1e-5
