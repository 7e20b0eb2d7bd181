"""The training loop (exact resumption from orbax checkpoints, EMA, failure on a
non-finite loss)."""

import io
import json
import os
import re
import shutil
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxflow as jf
from jaxflow import _train
from jaxflow._train import _Progress

PATH = jf.RectifiedFlow()


def _loss(m, x, k):
    return jf.flow_matching_loss(m, PATH, x, k)


def _leaves(model):
    return jax.tree.leaves(eqx.filter(model, eqx.is_array))


@pytest.fixture(scope="module")
def setup():
    data = jf.data.two_moons(jax.random.PRNGKey(0), 2000, dtype=jnp.float64)
    model = jf.nn.MLP(2, 32, 2, key=jax.random.PRNGKey(1))
    return data, model


def test_resumed_run_equals_a_straight_run(setup, tmp_path):
    """2N steps straight against N steps, a stop, and N more from the checkpoint
    (with other chunk sizes): the same weights, EMA and losses."""
    data, model = setup
    key = jax.random.PRNGKey(2)
    straight = jf.train(model, _loss, data, steps=120, key=key, chunk=40, progress=False)
    first = jf.train(
        model,
        _loss,
        data,
        steps=60,
        key=key,
        chunk=25,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=30,
        progress=False,
        config=dict(lr=1e-3),
    )
    assert first.step == 60
    resumed = jf.train(
        model,
        _loss,
        data,
        steps=120,
        key=key,
        chunk=35,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=30,
        progress=False,
    )
    assert resumed.step == 120 and resumed.losses.shape == (60,)
    for a, b in zip(_leaves(straight.model), _leaves(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(straight.ema), _leaves(resumed.ema), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(straight.losses[60:], resumed.losses)
    np.testing.assert_array_equal(straight.losses[:60], first.losses)
    # the whole TrainState, optimiser state and step included, leaf for leaf
    assert isinstance(resumed.state, jf.TrainState)
    assert int(resumed.state.step) == resumed.step == 120
    a, b = jax.tree.flatten(straight.state), jax.tree.flatten(resumed.state)
    assert a[1] == b[1]
    for x, y in zip(a[0], b[0], strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    m, ema, step, config = jf.load_checkpoint(str(tmp_path), model)
    assert step == 120 and config["step"] == 120
    assert config["prng_key"] == np.asarray(key).tolist()
    # another key would not continue this run
    with pytest.raises(ValueError, match="another key"):
        jf.train(
            model,
            _loss,
            data,
            steps=150,
            key=jax.random.PRNGKey(3),
            checkpoint_dir=str(tmp_path),
            progress=False,
        )
    for a, b in zip(_leaves(m), _leaves(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    # training reduced the loss, and the EMA lags the weights
    assert straight.losses[-20:].mean() < straight.losses[:20].mean()
    assert any(
        not np.allclose(a, b)
        for a, b in zip(_leaves(straight.ema), _leaves(straight.model), strict=True)
    )


def test_load_checkpoint_needs_no_optimiser(setup, tmp_path):
    """Weights written by a run with a scheduled optimiser (another optimiser-state
    structure than the default) load back from the model template alone."""
    data, model = setup
    run = jf.train(
        model,
        _loss,
        data,
        steps=20,
        key=jax.random.PRNGKey(5),
        progress=False,
        optimiser=optax.adamw(optax.cosine_decay_schedule(1e-3, 20)),
        checkpoint_dir=str(tmp_path),
    )
    m, ema, step, _ = jf.load_checkpoint(str(tmp_path), model)
    assert step == 20
    for a, b in zip(_leaves(m) + _leaves(ema), _leaves(run.model) + _leaves(run.ema), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ema_with_zero_decay_is_the_model(setup):
    data, model = setup
    r = jf.train(
        model, _loss, data, steps=10, key=jax.random.PRNGKey(3), ema_decay=0.0, progress=False
    )
    for a, b in zip(_leaves(r.ema), _leaves(r.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    """A run checkpointed at step 40, resumed with a loss that turns NaN: it stops
    with a message naming the checkpoint, which is left as it was."""
    data, model = setup
    kwargs = dict(
        key=jax.random.PRNGKey(4),
        chunk=20,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=20,
        progress=False,
    )
    good = jf.train(model, _loss, data, steps=40, **kwargs)
    with pytest.raises(FloatingPointError, match="last good checkpoint \\(step 40\\)"):
        jf.train(model, lambda m, x, k: _loss(m, x, k) * jnp.nan, data, steps=80, **kwargs)
    kept, _, step, _ = jf.load_checkpoint(str(tmp_path), model)
    assert step == 40
    for a, b in zip(_leaves(kept), _leaves(good.model), strict=True):
        np.testing.assert_array_equal(a, b)


# Recovery from damaged checkpoints: a straight run of 20 steps checkpointed at 10 and
# 20, copied and damaged by each test. Each train call compiles a step (about a
# second), so only one test runs steps; the others resume at the step they ask for.
_RUN20 = dict(key=jax.random.PRNGKey(6), chunk=10, checkpoint_every=10, batch_size=64)


@pytest.fixture(scope="module")
def run20(setup, tmp_path_factory):
    """`(directory, the weights and EMA at step 10, the run)`."""
    data, model = setup
    directory = str(tmp_path_factory.mktemp("run20"))
    run = jf.train(model, _loss, data, steps=20, checkpoint_dir=directory, progress=False, **_RUN20)
    assert sorted(os.listdir(directory)) == ["10", "20"]
    shutil.copytree(directory, directory + "_at10", ignore=shutil.ignore_patterns("20"))
    m, ema, _, _ = jf.load_checkpoint(directory + "_at10", model)
    return directory, (_leaves(m), _leaves(ema)), run


def _assert_same_state(a, b):
    (a, a_def), (b, b_def) = jax.tree.flatten(a), jax.tree.flatten(b)
    assert a_def == b_def
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _copy(run20, tmp_path):
    directory = str(tmp_path / "ckpt")
    shutil.copytree(run20[0], directory)
    return directory


def _resume(model, data, directory, steps, **changes):
    """`train` resumed from the `run20` checkpoint in `directory`, with its settings
    (`_RUN20`) but for `changes`."""
    settings = dict(_RUN20, **changes)
    return jf.train(
        model, _loss, data, steps=steps, checkpoint_dir=directory, progress=False, **settings
    )


# orbax, failing one read, leaves its other reads' coroutines to be reported as
# unraisable when collected: noise on stderr, not an error that reaches the caller
_ORBAX_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _truncate_arrays(directory, _):
    # orbax writes the arrays into OCDBT files under ocdbt.process_0/d
    data_dir = os.path.join(directory, "20", "weights", "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):
        with open(os.path.join(data_dir, name), "r+b") as f:
            f.truncate(5)


def _garbage_config(directory, _):
    with open(os.path.join(directory, "20", "config", "metadata"), "w") as f:
        f.write("{not json")


def _delete_metadata(directory, _):
    os.remove(os.path.join(directory, "20", "weights", "_METADATA"))


def _empty_folder(directory, _):
    shutil.rmtree(os.path.join(directory, "20"))
    os.mkdir(os.path.join(directory, "20"))


def _nan_weights(directory, run20):
    """Step 20 rewritten, intact, with NaN weights."""
    ocp, manager = _train._checkpoint_manager(directory)
    manager.delete(20)
    state = run20[2].state
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params)
    config = dict(prng_key=np.asarray(_RUN20["key"]).tolist())
    _train._save(ocp, manager, jf.TrainState(nan, state.ema, state.opt_state, state.step), config)


def _no_jaxflow_warning(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    assert not [w for w in caught if "jaxflow" in str(w.message)]
    return out


@_ORBAX_NOISE
@pytest.mark.parametrize(
    "damage",
    [_truncate_arrays, _garbage_config, _delete_metadata, _empty_folder, _nan_weights],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(setup, run20, tmp_path, damage):
    """Step 20 damaged: load_checkpoint warns and reads step 10, leaving the files;
    train warns, moves step 20 aside and resumes from step 10 (asked for 10 steps,
    it returns step 10's weights and EMA with no losses)."""
    data, model = setup
    directory = _copy(run20, tmp_path)
    damage(directory, run20)
    with pytest.warns(UserWarning, match="step 20 does not restore .*; using step 10"):
        m, ema, step, _ = jf.load_checkpoint(directory, model)
    assert step == 10 and sorted(os.listdir(directory)) == ["10", "20"]
    _assert_same_state((_leaves(m), _leaves(ema)), run20[1])
    with pytest.warns(UserWarning, match="step 20 does not restore .*using step 10.*unrestorable"):
        resumed = jf.train(
            model, _loss, data, steps=10, checkpoint_dir=directory, progress=False, **_RUN20
        )
    assert sorted(os.listdir(directory)) == ["10", "20.unrestorable"]
    assert resumed.step == 10 and resumed.losses.shape == (0,)
    _assert_same_state((_leaves(resumed.model), _leaves(resumed.ema)), run20[1])


@_ORBAX_NOISE
def test_a_run_resumed_past_a_damaged_checkpoint_equals_an_undamaged_one(setup, run20, tmp_path):
    """Step 20 truncated: the run resumed from step 10 ends in the state of the
    straight run, leaf for leaf, and writes a step 20 that loads without a warning."""
    data, model = setup
    directory = _copy(run20, tmp_path)
    _truncate_arrays(directory, run20)
    with pytest.warns(UserWarning, match="step 20 does not restore"):
        resumed = jf.train(
            model, _loss, data, steps=20, checkpoint_dir=directory, progress=False, **_RUN20
        )
    np.testing.assert_array_equal(resumed.losses, run20[2].losses[10:])
    _assert_same_state(resumed.state, run20[2].state)
    m, _, step, _ = _no_jaxflow_warning(jf.load_checkpoint, directory, model)
    assert step == 20
    _assert_same_state(eqx.filter(m, eqx.is_array), run20[2].state.params)


def test_a_stray_empty_step_folder_does_not_block(setup, run20, tmp_path):
    """`mkdir ckpt/40` beside a finished 20-step run: skipped with a warning, moved
    aside, and the run (at step 20 already) returned as it is, with no losses."""
    data, model = setup
    directory = _copy(run20, tmp_path)
    os.mkdir(os.path.join(directory, "40"))
    with pytest.warns(UserWarning, match="step 40 does not restore .*using step 20"):
        done = jf.train(
            model, _loss, data, steps=20, checkpoint_dir=directory, progress=False, **_RUN20
        )
    assert done.step == 20 and done.losses.shape == (0,)
    assert sorted(os.listdir(directory)) == ["10", "20", "40.unrestorable"]
    _assert_same_state(done.state, run20[2].state)


def test_no_step_restores_raises_naming_each(setup, run20, tmp_path):
    """Every step damaged: a ValueError naming the directory, each step and its
    cause, from train and load_checkpoint alike; nothing is moved."""
    data, model = setup
    directory = _copy(run20, tmp_path)
    _empty_folder(directory, None)
    with open(os.path.join(directory, "10", "config", "metadata"), "w") as f:
        f.write("")
    match = (
        f"no checkpoint in {re.escape(directory)} restores \\(steps 20, 10 tried.*"
        "step 20: FileNotFoundError.*step 10: JSONDecodeError"
    )
    with pytest.raises(ValueError, match=match):
        _resume(model, data, directory, 30)
    with pytest.raises(ValueError, match=match):
        jf.load_checkpoint(directory, model)
    assert sorted(os.listdir(directory)) == ["10", "20"]


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(width=16),
            "holds a model whose leaf `layers\\[0\\].weight` is of shape \\(32, 34\\); "
            "this model's is of shape \\(16, 34\\): pass the same architecture",
        ),
        (
            dict(optimiser=optax.sgd(1e-3)),
            "holds an optimiser state with a leaf `\\[0\\].count` that this optimiser's "
            "state lacks: pass the optimiser that run was started with",
        ),
    ],
)
def test_a_checkpoint_of_another_model_or_optimiser_raises(setup, run20, change, match):
    """Another width or optimiser: a ValueError naming the first differing leaf,
    not orbax's advice and not a fall back to an older step (which shares it)."""
    data, model = setup
    if "width" in change:
        model = jf.nn.MLP(2, change["width"], 2, key=jax.random.PRNGKey(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        with pytest.raises(ValueError, match=match):
            _resume(model, data, run20[0], 30, optimiser=change.get("optimiser"))
        if "width" in change:
            with pytest.raises(ValueError, match=match):
                jf.load_checkpoint(run20[0], model)
    assert sorted(os.listdir(run20[0])) == ["10", "20"]


def _no_step(*args):
    raise AssertionError("a step ran")


def test_a_checkpoint_of_another_batch_size_raises(setup, run20, monkeypatch):
    """A run checkpointed with batch_size=64, resumed with 256: its steps drew
    batches of 64, so carrying on with 256 would continue no run. Refused before
    any step, as another key is; the checkpoint records the size and is unchanged."""
    data, model = setup
    assert jf.load_checkpoint(run20[0], model)[3]["batch_size"] == _RUN20["batch_size"] == 64
    monkeypatch.setattr(_train, "_run_chunk", _no_step)
    match = (
        f"checkpoint in {re.escape(run20[0])} was written by a run with batch_size=64, "
        "not 256: .*Pass batch_size=64, or start in a new checkpoint_dir"
    )
    with pytest.raises(ValueError, match=match):
        _resume(model, data, run20[0], 30, batch_size=256)
    assert sorted(os.listdir(run20[0])) == ["10", "20"]


def test_a_checkpoint_without_the_batch_size_record_still_resumes(setup, run20, tmp_path):
    """A checkpoint written before `train` recorded its batch size: read by
    `load_checkpoint`, and resumed by `train` at any batch size (nothing to check it
    against), without a warning."""
    data, model = setup
    directory = _copy(run20, tmp_path)
    for step in ("10", "20"):
        path = os.path.join(directory, step, "config", "metadata")
        with open(path) as f:
            config = json.load(f)
        del config["batch_size"]
        with open(path, "w") as f:
            json.dump(config, f)
    _, _, step, config = _no_jaxflow_warning(jf.load_checkpoint, directory, model)
    assert step == 20 and "batch_size" not in config
    done = _no_jaxflow_warning(lambda: _resume(model, data, directory, 20, batch_size=256))
    assert done.step == 20 and done.losses.shape == (0,)
    _assert_same_state(done.state, run20[2].state)


def test_fewer_steps_than_the_checkpoint(setup, run20, tmp_path):
    """steps below the checkpoint's raises; equal to it returns it, with no losses."""
    data, model = setup
    kwargs = dict(checkpoint_dir=_copy(run20, tmp_path), progress=False, **_RUN20)
    with pytest.raises(ValueError, match="holds step 20, past steps=5: pass steps >= 20"):
        jf.train(model, _loss, data, steps=5, **kwargs)
    done = jf.train(model, _loss, data, steps=20, **kwargs)
    assert done.step == 20 and done.losses.shape == (0,)
    _assert_same_state(done.state, run20[2].state)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(lr=np.float32(1e-3)), "config\\['lr'\\] \\(a float32\\) is not JSON"),
        (dict(opt=dict(betas=jnp.ones(2))), "config\\['opt'\\] \\(a dict\\) is not JSON"),
        (dict(step=3), "reserved key\\(s\\) \\['step'\\]"),
        (dict(prng_key=[0, 1]), "reserved key\\(s\\) \\['prng_key'\\]"),
        (dict(batch_size=32), "config\\['batch_size'\\] is 32, but batch_size=256: .*Drop"),
        ({1: 2}, "config keys must be strings, got 1"),
    ],
)
def test_a_bad_config_raises_before_any_step(setup, tmp_path, monkeypatch, config, match):
    """Checked before anything runs or is written (not at the first save)."""
    data, model = setup
    monkeypatch.setattr(_train, "_run_chunk", _no_step)
    directory = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=match):
        jf.train(
            model,
            _loss,
            data,
            steps=10,
            key=jax.random.PRNGKey(0),
            config=config,
            checkpoint_dir=str(directory),
            progress=False,
        )
    assert not directory.exists()


def test_a_directory_that_cannot_hold_checkpoints_raises(setup, tmp_path, monkeypatch):
    """checkpoint_dir a file, or under one, raises before any step;
    load_checkpoint on a missing directory raises and does not create it."""
    data, model = setup
    monkeypatch.setattr(_train, "_run_chunk", lambda *a: pytest.fail("a step ran"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    kwargs = dict(steps=10, key=jax.random.PRNGKey(0), progress=False)
    with pytest.raises(ValueError, match="is a file, not a directory"):
        jf.train(model, _loss, data, checkpoint_dir=str(a_file), **kwargs)
    with pytest.raises(ValueError, match="cannot be written \\(Not a directory\\)"):
        jf.train(model, _loss, data, checkpoint_dir=str(a_file / "ckpt"), **kwargs)
    with pytest.raises(ValueError, match="is not a directory: pass the checkpoint_dir"):
        jf.load_checkpoint(str(tmp_path / "missing"), model)
    assert not (tmp_path / "missing").exists()


def test_bad_input_raises(setup):
    data, model = setup
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="\\(N, n\\)"):
        jf.train(model, _loss, data[:, 0], steps=1, key=key)
    with pytest.raises(ValueError, match="NaN"):
        jf.train(model, _loss, data.at[0, 0].set(jnp.nan), steps=1, key=key)
    with pytest.raises(ValueError, match="loss_fn failed"):
        jf.train(model, _loss, jnp.ones((10, 3)), steps=1, key=key)
    with pytest.raises(ValueError, match="steps"):
        jf.train(model, _loss, data, steps=0, key=key)
    with pytest.raises(ValueError, match="ema_decay"):
        jf.train(model, _loss, data, steps=1, key=key, ema_decay=1.0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        jf.train(model, _loss, data, steps=1, key=key, checkpoint_every=0)


def test_progress_is_one_plain_line_a_chunk_in_a_log(setup, capsys):
    """stderr captured, not a terminal (a log, CI): a full line a chunk, no bar."""
    data, _ = setup
    model = jf.nn.MLP(2, 8, 1, key=jax.random.PRNGKey(1))
    jf.train(model, _loss, data, steps=6, chunk=3, batch_size=16, key=jax.random.PRNGKey(2))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 3/6", "step 6/6"]
    assert all("loss " in line and "\r" not in line for line in lines)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_terminal_is_a_tqdm_bar_or_a_redrawn_line(monkeypatch):
    """In a terminal: a tqdm bar with the loss in its postfix; without tqdm, which
    is optional, the line redrawn with a carriage return and ended at the close,
    also when the run stops early. Disabled, nothing at all."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with _Progress(True, 10, 30) as report:
        report.update(20, 0.5)
        report.update(30, 0.25)
    out = sys.stderr.getvalue()
    assert "30/30" in out and "loss=0.25" in out and out.endswith("\n")
    monkeypatch.setitem(sys.modules, "tqdm", None)
    for stop in (30, 20):
        monkeypatch.setattr(sys, "stderr", _Terminal())
        with _Progress(True, 10, 30) as report:
            for step in range(20, stop + 1, 10):
                report.update(step, 0.5)
        out = sys.stderr.getvalue()
        assert out.startswith("\rstep 20/30  loss 0.5") and out.count("\n") == 1
        assert out.endswith("\n") and ("\rstep 30/30" in out) == (stop == 30)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with _Progress(False, 0, 30) as report:
        report.update(30, 0.5)
    assert sys.stderr.getvalue() == ""


def test_bar_on_a_terminal_of_unknown_or_zero_size_is_80_columns(monkeypatch):
    """A pty whose size was never set reports 0 x 0: tqdm sized from it draws blank
    lines, so the bar falls back to 80 x 24; a known size is followed as it changes."""
    _bar_size = _train._bar_size
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((0, 0)))
    assert _bar_size(sys.__stderr__) == {"ncols": 80, "nrows": 24}
    assert _bar_size(io.StringIO()) == {"ncols": 80, "nrows": 24}  # no terminal at all
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((120, 0)))
    assert _bar_size(sys.__stderr__) == {"ncols": 120, "nrows": 24}
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((120, 40)))
    assert _bar_size(sys.__stderr__) == {"dynamic_ncols": True}
    tqdm = pytest.importorskip("tqdm").tqdm
    out = io.StringIO()
    with tqdm(total=3, file=out, **_bar_size(out)) as bar:  # drawn, 80 wide
        bar.update(3)
    assert "3/3" in out.getvalue() and len(out.getvalue().split("\r")[-1].rstrip()) == 80
