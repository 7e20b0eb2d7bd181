"""The training loop (exact resumption from orbax checkpoints, EMA, failure on a
non-finite loss) and the data loaders."""

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


def test_digits_are_the_real_dataset_in_range():
    x, y = jf.data.digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.all(np.bincount(y) > 170)  # ten classes, about 180 each
    # a zero: ink around a hole in the middle of the image
    zero = x[y == 0].mean(0).reshape(8, 8)
    assert zero[3:5, 3:5].mean() < zero[1:7, 1:7].mean()
    x16, _ = jf.data.digits(16)
    img = x16.reshape(-1, 16, 16)
    np.testing.assert_array_equal(img[:, 4:12, 4:12].reshape(-1, 64), x)
    assert np.all(img[:, :4] == -1) and np.all(img[:, :, 12:] == -1)
    x32, _ = jf.data.digits(32)
    np.testing.assert_array_equal(x32.reshape(-1, 32, 32)[:, ::2, ::2], img)
    with pytest.raises(ValueError, match="size"):
        jf.data.digits(12)


def test_mnist_through_tensorflow_datasets_mock_data(monkeypatch):
    """`data.mnist` reads tfds' records (random images under `mock_data`; nothing
    downloads) and maps the uint8 pixels to [-1, 1], flat, padded for 32."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10):
        x, y = jf.data.mnist("train")
        raw = tfds.data_source("mnist", split="train")
        pixels = np.stack([np.asarray(raw[i]["image"]) for i in range(10)]).reshape(10, 784)
        x32, y32 = jf.data.mnist("train", size=32)
    assert x.shape == (10, 784) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, pixels / 127.5 - 1.0, rtol=1e-6, atol=1e-6)
    assert np.all((0 <= y) & (y <= 9))
    img = x32.reshape(10, 32, 32)
    np.testing.assert_array_equal(img[:, 2:30, 2:30].reshape(10, 784), x)
    assert np.all(img[:, :2] == -1) and np.all(img[:, :, 30:] == -1)
    np.testing.assert_array_equal(y32, y)
    with pytest.raises(ValueError, match="size"):
        jf.data.mnist(size=16)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"jaxflow\[data\]"):
        jf.data.mnist()


def test_samplers_lie_on_their_supports():
    x = np.asarray(jf.data.two_moons(jax.random.PRNGKey(0), 4000, noise=0.0))
    upper = np.abs(np.hypot(x[:, 0], x[:, 1]) - 1) < 1e-5
    lower = np.abs(np.hypot(x[:, 0] - 1, x[:, 1] - 0.5) - 1) < 1e-5
    assert np.all(upper | lower) and 0.45 < upper.mean() < 0.55
    g = np.asarray(jf.data.eight_gaussians(jax.random.PRNGKey(1), 8000, scale=0.01))
    angles = np.round(np.arctan2(g[:, 1], g[:, 0]) / (np.pi / 4)) % 8
    assert np.all(np.abs(np.hypot(g[:, 0], g[:, 1]) - 2) < 0.06)
    assert np.all(np.abs(np.bincount(angles.astype(int), minlength=8) - 1000) < 150)
    with pytest.raises(ValueError, match="n must"):
        jf.data.two_moons(jax.random.PRNGKey(0), 0)
