"""Validation shared by laws, paths, fields, networks and entry points.

Values known at construction raise `ValueError` naming the fix; values only known
under `jit` (tracers) go through `eqx.error_if`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike


def is_concrete(*arrays) -> bool:
    """True when every argument holds concrete values (not a tracer under jit)."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def as_float_array(name: str, value, ndim=None) -> jax.Array:
    """Convert to a floating JAX array; check rank and finiteness when concrete."""
    if value is None:
        raise ValueError(f"{name} is required, got None.")
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in ndims:
            want = " or ".join(str(d) for d in ndims)
            raise ValueError(f"{name} must have {want} dimension(s), got shape {arr.shape}.")
    if is_concrete(arr) and not bool(np.all(np.isfinite(np.asarray(arr)))):
        raise ValueError(f"{name} contains NaN or infinite values; pass finite numbers.")
    return arr


def check_weights(name: str, weights: ArrayLike) -> None:
    """Mixture weights: positive and summing to one (checked when concrete)."""
    if not is_concrete(weights):
        return
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        raise ValueError(f"{name} is empty; a mixture needs at least one component.")
    if np.any(w <= 0):
        raise ValueError(
            f"{name} must all be > 0, got min {w.min():.3g}; drop the components "
            "with zero weight or give them a positive one."
        )
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"{name} must sum to one, got {w.sum():.8g}; pass weights / weights.sum()."
        )


def check_spd(name: str, matrices: ArrayLike) -> None:
    """Symmetric positive definite (batch of matrices, last two axes)."""
    m = np.asarray(matrices, dtype=np.float64)
    asym = np.max(np.abs(m - np.swapaxes(m, -1, -2)), initial=0.0)
    scale = max(np.max(np.abs(m), initial=0.0), 1e-300)
    if asym > 1e-6 * scale:
        raise ValueError(
            f"{name} must be symmetric, max |S - S^T| = {asym:.3g}; pass (S + S.T) / 2."
        )
    eig = np.linalg.eigvalsh(0.5 * (m + np.swapaxes(m, -1, -2)))
    if np.any(eig <= 0):
        raise ValueError(
            f"{name} must be positive definite, smallest eigenvalue {eig.min():.3g}; "
            "add a small multiple of the identity (S + eps * I)."
        )


def check_positive(name: str, values) -> None:
    if is_concrete(values) and np.any(np.asarray(values) <= 0):
        raise ValueError(
            f"{name} must be > 0 everywhere, got min {np.min(np.asarray(values)):.3g}."
        )


def check_positive_int(name: str, value) -> int:
    """A positive Python or NumPy integer (not a bool), returned as `int`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def time_in_range(path, t):
    """True where the (possibly traced) time `t` is finite and in `path`'s range."""
    return (t >= path.t_data) & (t <= path.t_noise) & jnp.isfinite(t)


def check_time_in_range(path, x, t, what: str = "time t"):
    """`eqx.error_if` on `x` when a (traced) time lies outside `path`'s range."""
    bad = ~time_in_range(path, t)
    return eqx.error_if(
        x, bad, f"{what} is outside the path's range [t_data, t_noise]; clip it to it."
    )


def check_time_grid(times, t_noise, t_data) -> np.ndarray:
    """A concrete grid of times increasing strictly from the data end to the noise
    end (`times=` of `generate`, `invert`, `sample_ddpm`), as NumPy floats."""
    if isinstance(times, jax.core.Tracer):
        raise ValueError("times must be a concrete grid (a NumPy array), not traced under jit.")
    times = np.asarray(times, dtype=float)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid of at least 2 times, got shape {times.shape}.")
    if not np.all(np.diff(times) > 0):
        raise ValueError(
            "times must increase strictly from the data end to the noise end (generate "
            "walks the grid backwards, invert forwards)."
        )
    if t_noise is not None or t_data is not None:
        raise ValueError("times= sets the span's ends; leave t_noise and t_data unset.")
    return times
