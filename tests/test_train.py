"""The training loop (exact resumption from orbax checkpoints, EMA, failure on a
non-finite loss)."""

import io
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxflow as jf
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
