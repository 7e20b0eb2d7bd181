"""jaxflow.data: the bundled digits, MNIST through tensorflow-datasets' mock data,
and the samplers on their supports."""

import sys

import jax
import numpy as np
import pytest

import jaxflow as jf


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
