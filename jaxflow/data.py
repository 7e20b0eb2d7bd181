"""Data: training sets, samplers and the closed-form laws of the papers' examples.

- Training data: scikit-learn's bundled handwritten digits (offline), MNIST
  through tensorflow-datasets, and the two-moons and eight-Gaussians samplers of
  the flow-matching literature (paper 003 appendix G.5; Tong et al. 2024). Images
  come back flat, `(N, C * H * W)`, scaled to `[-1, 1]`, to feed `jf.nn.UNet` and
  every analysis that works on flat vectors.
- The papers' example laws, with their parameters in one place: the paper 000
  Fig. 3 mixture and the mixtures of Gaussian neighbours of its Assumption 4.4.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._laws import GaussianMixture, GaussianNeighbours
from ._misc import check_key, check_number, check_positive_int

_DATA = "pip install 'jaxflow[data]'"


def digits(size: int | np.integer = 8, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real 8x8 handwritten digits that ship with scikit-learn (no
    download), as `(images, labels)`.

    **Arguments:**

    - `size`: 8 (the native resolution), or 16 / 32: the 8x8 image is zero-padded
      (in `[-1, 1]` units, the background value) to 16 x 16, then upsampled 2x by
      pixel repetition for 32.
    - `dtype`: of the images.

    **Returns:** images `(1797, size * size)` in `[-1, 1]` (ink is +1) and labels
    `(1797,)`.
    """
    if size not in (8, 16, 32):
        raise ValueError(f"size must be 8, 16 or 32, got {size!r}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "jaxflow.data.digits needs scikit-learn: pip install 'jaxflow[data]'."
        ) from e
    bunch = load_digits()
    # pixel values are counts 0..16 of a 4x4 block of the original bitmap
    images = bunch.images.astype(np.float64) / 8.0 - 1.0
    if size >= 16:
        images = np.pad(images, ((0, 0), (4, 4), (4, 4)), constant_values=-1.0)
    if size == 32:
        images = images.repeat(2, axis=1).repeat(2, axis=2)
    return images.reshape(len(images), -1).astype(dtype), bunch.target.astype(np.int32)


def mnist(
    split: str = "train",
    *,
    size: int | np.integer = 28,
    data_dir: str | None = None,
    download: bool = True,
    dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST (paper 003 G.3) through tensorflow-datasets' `data_source`, which
    reads the prepared ArrayRecord files without TensorFlow.

    The first call downloads and prepares the dataset under `data_dir` (default
    `~/tensorflow_datasets`). That one step runs tfds' MNIST builder, which reads
    the raw files with `tf.io.gfile` and so needs TensorFlow (`pip install
    tensorflow-cpu`). Later calls read the prepared files without it. Tests run
    it under `tfds.testing.mock_data`, which downloads nothing.

    **Arguments:**

    - `split`: a tfds split (`'train'`, `'test'`, `'train[:1000]'`, ...).
    - `size`: 28 (native) or 32 (zero-padded by 2 pixels of background, so that
      a UNet can halve it three times).
    - `data_dir`, `download`: passed to `tfds.data_source`.
    - `dtype`: of the images.

    **Returns:** images `(N, size * size)` in `[-1, 1]` (ink is +1) and labels `(N,)`.

    **Raises:** `ValueError` for a `size` other than 28 or 32; `ImportError` naming
    `pip install 'jaxflow[data]'` (with the module that failed to import, the
    original error chained) when tensorflow-datasets or anything it imports is
    missing, including TensorFlow when the data must first be prepared;
    `FileNotFoundError` with `download=False` when the data are not prepared under
    `data_dir`.
    """
    if size not in (28, 32):
        raise ValueError(f"size must be 28 or 32, got {size!r}.")
    where = data_dir or "~/tensorflow_datasets"
    prepare = (
        "Preparing the data, once, needs TensorFlow too (pip install tensorflow-cpu): "
        f"call jaxflow.data.mnist(data_dir={data_dir!r}) with download=True, or run "
        f"`tfds build mnist --file_format=array_record --data_dir {where}`; later calls "
        "read the prepared files without TensorFlow."
    )
    try:
        import tensorflow_datasets as tfds

        source = tfds.data_source("mnist", split=split, data_dir=data_dir, download=download)
    except ImportError as e:  # tfds itself, or anything it imports on the way
        missing = e.name or "a module"
        raise ImportError(
            f"jaxflow.data.mnist needs tensorflow-datasets and its dependencies: "
            f"importing {missing!r} failed ({e}). Install them with {_DATA}"
            f"{f' (here: pip install {e.name})' if e.name else ''}. {prepare}"
        ) from e
    except NotImplementedError as e:  # tfds' complaint when nothing is prepared
        if download:
            raise
        raise FileNotFoundError(
            f"jaxflow.data.mnist(download=False): MNIST is not prepared under {where} "
            f"(as the array_record files it reads). {prepare}"
        ) from e
    records = [source[i] for i in range(len(source))]
    if not records:
        raise ValueError(f"the MNIST split {split!r} is empty.")
    images = np.stack([np.asarray(r["image"]).reshape(28, 28) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    images = images.astype(np.float64) / 127.5 - 1.0
    if size == 32:
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)
    return images.reshape(len(images), -1).astype(dtype), labels


def two_moons(
    key: PRNGKeyArray, n: int | np.integer, *, noise: float = 0.05, dtype=jnp.float32
) -> Float[Array, "n 2"]:
    """`n` points on the two moons (upper `(cos u, sin u)`, lower
    `(1 - cos u, 1/2 - sin u)`, `u` uniform on `[0, pi]`, each moon with
    probability 1/2), plus Gaussian noise of standard deviation `noise`.

    **Raises:** `ValueError` for a `key` that is not one PRNG key, `n` not a positive
    int, `noise` not a finite number `>= 0`, or a `dtype` that is not floating.
    """
    n = _check_sampler(key, n, dtype)
    noise = check_number("noise", noise, 0)
    ku, km, kn = jax.random.split(key, 3)
    u = jax.random.uniform(ku, (n,), dtype, 0.0, math.pi)
    lower = jax.random.bernoulli(km, 0.5, (n,))
    upper_pts = jnp.stack([jnp.cos(u), jnp.sin(u)], -1)
    lower_pts = jnp.stack([1 - jnp.cos(u), 0.5 - jnp.sin(u)], -1)
    x = jnp.where(lower[:, None], lower_pts, upper_pts)
    return x + noise * jax.random.normal(kn, (n, 2), dtype)


def _check_dtype(dtype) -> None:
    """`dtype` floating (or `None`, the default float)."""
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}.")


def _check_sampler(key, n, dtype) -> int:
    """A sampler's key, count and dtype; returns `n` as an int."""
    check_key("key", key)
    _check_dtype(dtype)
    return check_positive_int("n", n)


def eight_gaussians(
    key: PRNGKeyArray,
    n: int | np.integer,
    *,
    radius: float = 2.0,
    scale: float = 0.1,
    dtype=jnp.float32,
) -> Float[Array, "n 2"]:
    """`n` points from eight equally weighted Gaussians of standard deviation
    `scale` centred on a circle of `radius` (the usual source or target of the
    flow-matching literature).

    **Raises:** as `two_moons`, and for `radius` or `scale` not a finite number
    `> 0`.
    """
    n = _check_sampler(key, n, dtype)
    radius = check_number("radius", radius, 0, open_low=True)
    scale = check_number("scale", scale, 0, open_low=True)
    kc, kn = jax.random.split(key)
    angle = 2 * math.pi * jax.random.randint(kc, (n,), 0, 8).astype(dtype) / 8
    centres = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    return centres + scale * jax.random.normal(kn, (n, 2), dtype)


#: Paper 000 Fig. 3 gives no parameters. We use three isotropic components with
#: variance 0.01 around a low-density centre: two of weight 0.3 above, one of
#: weight 0.4 below. The boundary between the lower mode's basin and the upper
#: two then crosses x = 0 near y = 0.05 in noise space (a shallow arch that falls
#: to y ~ -0.3 at the sides), so the generation map stretches the central region
#: along y (Fig. 3(b)); the two upper basins meet along x = 0 above it.
FIG3_WEIGHTS = (0.3, 0.3, 0.4)
FIG3_MEANS = ((-0.5, 0.5), (0.5, 0.5), (0.0, -0.5))
FIG3_VARIANCE = 0.01


def fig3_mixture(dtype=None) -> GaussianMixture:
    """The three-component 2-D mixture used for paper 000 Fig. 3 and Fig. 4."""
    _check_dtype(dtype)
    return GaussianMixture(
        jnp.asarray(FIG3_WEIGHTS, dtype),
        jnp.asarray(FIG3_MEANS, dtype),
        jnp.full(3, FIG3_VARIANCE, dtype),
    )


def _box_mass_per_coordinate(beta: float) -> float:
    # P(U + w xi in [0, b]) for U ~ Unif[0, b], beta = b / w; see own_box_mass.
    phi = lambda s: math.exp(-0.5 * s * s) / math.sqrt(2 * math.pi)  # noqa: E731
    return math.erf(beta / math.sqrt(2)) + 2 / beta * (phi(beta) - phi(0.0))


def width_for_box_mass(n: int | np.integer, side: float, alpha: float) -> float:
    """The width `w` for which a component on a cube of side `side` in `n` dimensions
    keeps mass `alpha` inside its cube (paper 000 Assumption 4.4.4 with a fixed
    `alpha`; `w` then shrinks like `side / n`, as the proof of Theorem 4.3 needs).

    **Raises:** `ValueError` for `n` not a positive int, `side` not a finite number
    `> 0`, or `alpha` outside `(0, 1)`.
    """
    n = check_positive_int("n", n)
    side = check_number("side", side, 0, open_low=True)
    alpha = check_number("alpha", alpha, 0, 1, open_low=True, open_high=True)
    target = math.log(alpha) / n
    lo, hi = 1e-6, 1e12  # beta = side / w; the per-coordinate mass rises with beta
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if math.log(_box_mass_per_coordinate(mid)) < target:
            lo = mid
        else:
            hi = mid
    return side / hi


def sparse_neighbours(
    n: int | np.integer,
    m: int | np.integer = 3,
    side: float = 0.05,
    alpha: float = 0.5,
    seed: int | np.integer = 0,
    dtype=None,
) -> GaussianNeighbours:
    """A mixture of Gaussian neighbours meeting paper 000 Assumption 4.4: `m` (fixed)
    cubes of side `side` at random places in `[0.1, 0.9]^n`, at least one side apart,
    equal weights, widths from `width_for_box_mass` so each keeps mass `alpha` in its
    own cube whatever `n`.

    **Raises:** `ValueError` for `n` or `m` not a positive int, `side` outside
    `(0, 0.8)` (the cubes' corners are drawn in `[0.1, 0.9 - side]`), and as
    `width_for_box_mass`.
    """
    n, m = check_positive_int("n", n), check_positive_int("m", m)
    _check_dtype(dtype)
    side = check_number("side", side, 0, 0.8, open_low=True, open_high=True)
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        lower = rng.uniform(0.1, 0.9 - side, (m, n))
        gap = np.maximum(0.0, np.abs(lower[:, None] - lower[None]) - side)
        dist = np.where(np.eye(m, dtype=bool), np.inf, np.sqrt((gap**2).sum(-1)))
        if dist.min() >= side:
            break
    else:  # pragma: no cover - only for absurd m, side
        raise ValueError(f"could not place {m} separated cubes of side {side} in n={n}.")
    w = width_for_box_mass(n, side, alpha)
    return GaussianNeighbours(
        jnp.full(m, 1 / m, dtype),
        jnp.asarray(lower, dtype),
        jnp.asarray(lower + side, dtype),
        jnp.full(m, w, dtype),
    )


#: The most cubes `tiling_neighbours` builds (`k ** n` grows fast: `10 ** 30` would
#: never finish).
MAX_TILING_CUBES = 1_000_000


def tiling_neighbours(
    n: int | np.integer, k: int | np.integer, width: float = 0.01, side: float = 0.02, dtype=None
) -> GaussianNeighbours:
    """`k^n` small cubes centred on a regular grid of `[0, 1]^n`: density is low between
    the cubes while their basins tile noise space, so `G^{-1}(x)` of a uniform `x`
    stays moderate and the bound of paper 000 Theorem 4.1 is informative.

    **Raises:** `ValueError` for `n` or `k` not a positive int, more than
    `MAX_TILING_CUBES` cubes (`k ** n`), `width` not a finite number `> 0`, or
    `side` outside `(0, 1 / k]` (the cubes would overlap).
    """
    n, k = check_positive_int("n", n), check_positive_int("k", k)
    if k**n > MAX_TILING_CUBES:
        raise ValueError(
            f"tiling_neighbours({n}, {k}) would build k ** n = {k}**{n} cubes, more than "
            f"{MAX_TILING_CUBES:,}; take a smaller k or n."
        )
    width = check_number("width", width, 0, open_low=True)
    _check_dtype(dtype)
    side = check_number("side", side, 0, 1 / k, open_low=True)
    c = (np.arange(k) + 0.5) / k
    centres = np.array(list(itertools.product(c, repeat=n)))
    m = len(centres)
    return GaussianNeighbours(
        jnp.full(m, 1 / m, dtype),
        jnp.asarray(centres - side / 2, dtype),
        jnp.asarray(centres + side / 2, dtype),
        jnp.full(m, width, dtype),
    )
