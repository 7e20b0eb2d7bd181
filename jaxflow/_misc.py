"""Validation shared by laws, paths, fields, networks and entry points.

Values known at construction raise `ValueError` naming the fix; values only known
under `jit` (tracers) go through `eqx.error_if`.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from ._linalg import eigh


def is_concrete(*arrays) -> bool:
    """True when every argument holds concrete values (not a tracer under jit)."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def as_array(name: str, value, want: str | None = None):
    """`value` as an array: an array (NumPy, JAX, traced) or `None` passes unchanged,
    a number or a nested list or tuple becomes a JAX array.

    A ragged nesting (rows of different lengths), which NumPy refuses with an
    "inhomogeneous shape" that names neither the argument nor the rows, raises a
    `ValueError` naming `name`, the first two entries whose shapes differ, and
    `want`, the shapes the argument takes.
    """
    if value is None or isinstance(value, (jax.Array, np.ndarray)):
        return value
    try:
        return jnp.asarray(value)
    except (ValueError, TypeError):
        ragged = _ragged_entries(value)
        if ragged is None:
            raise
    (first, first_shape), (other, other_shape) = ragged
    shapes = "" if want is None else f" of shape {want}"
    raise ValueError(
        f"{name} is ragged: entry {first} has shape {first_shape} but entry {other} has "
        f"shape {other_shape}. Pass a rectangular array{shapes}, every row the same length."
    ) from None


def _ragged_entries(value, index: str = ""):
    """The first two entries `(index, shape)` of a nested list whose shapes differ,
    at the deepest level where they do, or `None` for a rectangular nesting."""
    try:
        _nested_shape(value, index)
    except _Ragged as ragged:
        return ragged.args
    return None


class _Ragged(Exception):
    pass


def _nested_shape(value, index: str) -> tuple:
    """The shape of a nested list whose leaves are numbers or arrays (tracers too),
    without converting it; `_Ragged` with the two entries where it is not
    rectangular."""
    if not isinstance(value, (list, tuple)):
        return tuple(np.shape(value))
    shapes = [_nested_shape(entry, f"{index}[{i}]") for i, entry in enumerate(value)]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise _Ragged((f"{index}[0]", shapes[0]), (f"{index}[{i}]", shape))
    return (len(value),) + (shapes[0] if shapes else ())


def as_float_array(name: str, value, ndim=None, dtype=None) -> jax.Array:
    """Convert to a floating JAX array of `dtype` (default: the value's own floating
    dtype, the default float for integers and bools), refuse complex values, check the
    rank, and check finiteness in that dtype (a float64 `1e39` is `inf` in float32)."""
    if value is None:
        raise ValueError(f"{name} is required, got None.")
    value = as_array(name, value)
    xp = array_namespace(value)
    arr = xp.asarray(value)
    if xp.issubdtype(arr.dtype, xp.complexfloating):
        raise ValueError(
            f"{name} must be real, got dtype {arr.dtype}; pass its real part (.real) if "
            "the imaginary part is zero."
        )
    arr = arr.astype(float_dtype(arr) if dtype is None else dtype)
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in ndims:
            want = " or ".join(str(d) for d in ndims)
            raise ValueError(f"{name} must have {want} dimension(s), got shape {arr.shape}.")
    arr = check(
        arr,
        ~xp.isfinite(arr),
        f"{name} contains NaN or infinite values in {arr.dtype}; pass finite numbers.",
    )
    return jnp.asarray(arr)


def check_weights(name: str, weights: jax.Array, eps: float = 0.0) -> jax.Array:
    """Mixture weights, checked in their stored dtype and returned: each a normal
    positive number (denormals flush to zero on CPU), summing to one within
    `4 sqrt(K) eps`, a few roundings of normalising them. `eps` is the coarser of the
    stored dtype's and the one they were given in (`given_eps`), so that weights
    normalised in float32 stay acceptable in a float64 law."""
    k = weights.shape[-1]
    if k == 0:
        raise ValueError(f"{name} is empty; a mixture needs at least one component.")
    xp = array_namespace(weights)
    w = xp.asarray(weights)
    info = jnp.finfo(w.dtype)
    weights = check(
        weights,
        ~(w >= info.tiny),
        f"{name} must all be > 0 (normal {info.dtype} numbers, >= {info.tiny:.3g}); drop "
        "the components with zero weight or give them a positive one.",
        lambda: f"min {np.min(w):.3g}",
    )
    total = xp.sum(w, axis=-1)
    tol = 4 * math.sqrt(k) * max(float(info.eps), eps)
    return check(
        weights,
        ~(xp.abs(total - 1) <= tol),
        f"{name} must sum to one (within {tol:.2g}); pass weights / weights.sum().",
        lambda: f"sum {np.max(total):.10g}",
    )


def check_spd(name: str, matrices: jax.Array, eps: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Symmetrise and eigen-decompose a batch of covariance matrices (last two axes) in
    their stored dtype, checking the spectrum the law will use: `(V, lam)` with
    `S = V diag(lam) V^T`.

    - Symmetric within `sqrt(eps) max|S|` (`eps` as in `check_weights`).
    - `eigh` in this dtype is accurate to about `n eps max|lam|`: a smallest eigenvalue
      below minus that is negative (not positive definite); one within it is
      numerically singular (its sign is rounding), and so is one below the smallest
      normal number.
    """
    xp = array_namespace(matrices)
    m = xp.asarray(matrices)
    info = jnp.finfo(m.dtype)
    n = m.shape[-1]
    asym = xp.max(xp.abs(m - xp.swapaxes(m, -1, -2)), axis=(-2, -1))
    scale = xp.max(xp.abs(m), axis=(-2, -1))
    rel = math.sqrt(max(float(info.eps), eps))
    m = check(
        m,
        ~(asym <= rel * scale),
        f"{name} must be symmetric (to {rel:.1g} relative); pass (S + S.T) / 2.",
        lambda: f"max |S - S^T| = {np.max(asym):.3g}",
    )
    lam, vec = eigh(0.5 * (m + xp.swapaxes(m, -1, -2)))
    spectrum = xp.asarray(lam)
    lam = check(
        lam,
        ~xp.isfinite(spectrum),
        f"{name}: the eigendecomposition overflows {info.dtype}; rescale the covariances.",
    )
    lo, hi = spectrum[..., 0], xp.max(xp.abs(spectrum), axis=-1)
    band = n * info.eps * hi

    def got():
        return f"smallest eigenvalue {np.min(lo):.3g} of largest {np.max(hi):.3g}"

    lam = check(
        lam,
        ~(lo >= -band),
        f"{name} must be positive definite; add a small multiple of the identity (S + eps * I).",
        got,
    )
    fix = "add eps * I" + ("" if info.bits == 64 else " or use float64 (jax_enable_x64)")
    lam = check(
        lam,
        ~(lo > xp.maximum(band, info.tiny)),
        f"{name} are numerically singular in {info.dtype} (smallest eigenvalue at most "
        f"n * eps * largest, or below {info.tiny:.3g}): {fix}.",
        got,
    )
    return vec, lam


def check_positive(name: str, values: jax.Array, squared: bool = False) -> jax.Array:
    """`values`, checked and returned: each > 0 and a normal number of its dtype (a
    denormal flushes to zero on CPU); with `squared` (the law uses `values**2`), the
    square normal and finite too."""
    xp = array_namespace(values)
    v = xp.asarray(values)
    info = jnp.finfo(v.dtype)
    if squared:
        good = (v > 0) & (v * v >= info.tiny) & xp.isfinite(v * v)
        lo, hi = math.sqrt(info.tiny), math.sqrt(info.max)
        what = f"between {lo:.3g} and {hi:.3g}, so that the squares are normal and finite,"
    else:
        good = v >= info.tiny
        what = f"normal numbers, >= {info.tiny:.3g},"
    return check(
        values,
        ~good,
        f"{name} must be > 0 everywhere ({what} in {info.dtype}).",
        lambda: f"min {np.min(v):.3g}, max {np.max(v):.3g}",
    )


def array_namespace(*values):
    """NumPy where every value is concrete, else `jax.numpy`: a check of concrete
    values then costs no XLA compilation (one per operation and shape, eagerly)."""
    return np if is_concrete(*jax.tree.leaves(values)) else jnp


def check(array, bad: ArrayLike, message: str, got=None):
    """`array`, checked: `ValueError(message)` now when `bad` is concrete and any of it
    is True; `eqx.error_if(array, bad, message)` when it is traced (jit, vmap), so the
    check is part of computing `array` and fires once, when that value is computed.

    `got` (no arguments; called only to raise eagerly) adds the offending values: the
    message must stand without them, as the traced error cannot show them.
    """
    if not is_concrete(bad):
        return eqx.error_if(array, bad, message)
    if bool(np.any(np.asarray(bad))):
        raise ValueError(message if got is None else f"{message} Got {got()}.")
    return array


def float_dtype(*values) -> np.dtype:
    """The one floating dtype a law stores its arrays in: the result type of its
    inputs (`None` skipped), the default float where none of them is floating."""
    dtype = jnp.result_type(*(jnp.asarray(v) for v in values if v is not None))
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def given_eps(value) -> float:
    """The rounding unit of the floating dtype `value` was given in (0 for `None`,
    integers and bools, which are exact): the precision a tolerance must allow for."""
    if value is None:
        return 0.0
    dtype = jnp.asarray(value).dtype
    return float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0


def check_nonempty(law: str, k: int, n: int, item: str = "component") -> None:
    """A law needs at least one component (point, box) and points with `n >= 1`."""
    if k < 1:
        raise ValueError(f"{law} needs at least one {item}, got {k}.")
    if n < 1:
        raise ValueError(f"{law} needs points of dimension n >= 1, got n = {n}.")


def check_bool(name: str, value) -> bool:
    """`True` or `False` (not a truthy stand-in), returned as given."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


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
    if not np.all(np.isfinite(times)):
        raise ValueError("times contains NaN or inf; pass a grid of finite times.")
    if not np.all(np.diff(times) > 0):
        raise ValueError(
            "times must increase strictly from the data end to the noise end (generate "
            "walks the grid backwards, invert forwards)."
        )
    if t_noise is not None or t_data is not None:
        raise ValueError("times= sets the span's ends; leave t_noise and t_data unset.")
    return times


# Arguments of the analysis, sampling, batching, objective, data and network entry
# points. Each check names the parameter as the user passed it.


def describe(value) -> str:
    """A bad argument, short, for a message: an array by its shape and dtype."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def check_nonnegative_int(name: str, value) -> int:
    """An int >= 0 (Python or NumPy, not a bool), returned as `int`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    return int(value)


def check_number(
    name: str, value, low=None, high=None, *, open_low=False, open_high=False, static=False
):
    """A real scalar argument, finite and within `low`/`high` (`None`: unbounded;
    `open_*`: the bound excluded).

    A concrete value comes back as a Python float, or raises `ValueError`. A traced
    one comes back behind an `eqx.error_if`; with `static` (a value that fixes a
    number of steps or a shape) a traced value raises `ValueError` instead.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if open_high else '<='} {high:g}")
    want = " ".join([f"{name} must be a finite real number", " and ".join(bounds)]).strip()
    numeric = isinstance(value, (int, float, np.number, np.ndarray, jax.Array))
    if (
        isinstance(value, bool)
        or not numeric
        or jnp.ndim(value) != 0
        or jnp.issubdtype(jnp.result_type(value), jnp.complexfloating)
    ):
        raise ValueError(f"{want}, got {describe(value)}.")
    traced = isinstance(value, jax.core.Tracer)
    if traced and static:
        raise ValueError(
            f"{name} must be known in Python, not traced under jit: it fixes the number "
            "of steps. Pass a Python number (close over it, or mark it static)."
        )
    if not traced:
        value = float(value)
    ok = jnp.isfinite(value) if traced else math.isfinite(value)
    if low is not None:
        ok = ok & ((value > low) if open_low else (value >= low))
    if high is not None:
        ok = ok & ((value < high) if open_high else (value <= high))
    if traced:
        return check(value, ~ok, want + ".")
    if not ok:
        raise ValueError(f"{want}, got {value!r}.")
    return value


def check_time(name: str, path, t):
    """A time argument (`t_noise=`, `t_data=`, `t=`) known in Python: a finite scalar
    in `path`'s range, returned as a float, else `ValueError` naming `name`. `None`
    and traced times pass unchanged (the solvers mark a traced one that lies outside
    the range as invalid input)."""
    if t is None or isinstance(t, jax.core.Tracer):
        if t is not None and jnp.ndim(t) != 0:
            raise ValueError(f"{name} must be a scalar time, got shape {jnp.shape(t)}.")
        return t
    return check_number(f"{name} (a time on the path's range)", t, path.t_data, path.t_noise)


def check_key(name: str, key):
    """One PRNG key: a typed key (`jax.random.key(0)`) or a raw one
    (`jax.random.PRNGKey(0)`), one per lane under `vmap`; else `ValueError`."""
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape == ():
                return key
        elif key.dtype == np.uint32:
            try:
                wrapped = jax.eval_shape(
                    jax.random.wrap_key_data, jax.ShapeDtypeStruct(key.shape, key.dtype)
                )
            except (TypeError, ValueError):
                wrapped = None
            if wrapped is not None and wrapped.shape == ():
                return key
    raise ValueError(
        f"{name} must be one PRNG key: pass jax.random.key(0) (or jax.random.PRNGKey(0)), "
        f"got {describe(key)}; for several keys, jax.vmap over jax.random.split(key, m)."
    )


def check_finite(name: str, x, where: str):
    """`x` with a check that it is finite: `ValueError` when concrete, `eqx.error_if`
    when traced."""
    return check(
        x,
        ~jnp.isfinite(x),
        f"{where}: {name} has non-finite entries (NaN or inf); pass finite values.",
    )


def as_point(name: str, x, where: str, *, finite: bool = True) -> jax.Array:
    """`x` as one point `(n,)`, `n >= 1`, of a floating dtype (integers become the
    default float), checked finite unless `finite=False`."""
    x = jnp.asarray(as_array(f"{where}: {name}", x, "(n,)"))
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(
            f"{where} takes {name} as one point of shape (n,) with n >= 1, got shape "
            f"{x.shape}; batch with jax.vmap."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return check_finite(name, x, where) if finite else x


def as_batch(name: str, x, where: str, *, finite: bool = True) -> jax.Array:
    """`x` as a batch of points `(N, n)` with `N, n >= 1`, of a floating dtype, checked
    finite unless `finite=False`."""
    x = jnp.asarray(as_array(f"{where}: {name}", x, "(N, n)"))
    if x.ndim != 2 or 0 in x.shape:
        empty = " (no samples)" if x.ndim == 2 and x.shape[0] == 0 else ""
        raise ValueError(
            f"{where}: {name} must be a batch of shape (N, n) with N >= 1 and n >= 1, got "
            f"shape {x.shape}{empty}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return check_finite(name, x, where) if finite else x


def check_same_shape(where: str, what: str, shape, x) -> None:
    """`what` (a map's output, a noise draw) has the shape of the point `x`."""
    if tuple(shape) != tuple(x.shape):
        raise ValueError(
            f"{where}: {what} must have the point's shape {tuple(x.shape)}, got shape "
            f"{tuple(shape)}."
        )


def check_map_output(where: str, fn_name: str, shape, x) -> None:
    """A map `F: R^n -> R^n` (a square Jacobian): `fn(x)` has `x`'s shape."""
    if tuple(shape) != tuple(x.shape):
        raise ValueError(
            f"{where}: {fn_name} must map a point of shape {tuple(x.shape)} to the same "
            f"shape (F: R^n -> R^n, a square Jacobian), got shape {tuple(shape)}."
        )


def check_network_input(where: str, x, t, n=None) -> jax.Array:
    """A network's call `f(x, t)`: `x` one point `(n,)` (any length when `n` is
    `None`) and `t` a scalar; returns `x` as a floating array."""
    x = jnp.asarray(x)
    if x.ndim != 1 or (n is not None and x.shape[0] != n):
        want = "(n,)" if n is None else f"({n},)"
        raise ValueError(
            f"{where} takes one flat point of shape {want}, got shape {x.shape}; for a "
            "batch, jax.vmap(net, in_axes=(0, None))(xs, t)."
        )
    if jnp.ndim(t) != 0:
        raise ValueError(
            f"{where}: t must be a scalar time, got shape {jnp.shape(t)}; for a batch of "
            "times, jax.vmap over x and t together."
        )
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def transformer_dtype(where: str, dtype) -> np.dtype:
    """The dtype a ported diffusion transformer (`jf.nn.SD3Transformer`,
    `jf.nn.FluxTransformer`) stores and computes in: float32 or bfloat16, else a
    `ValueError` naming the two."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(
            f"{where}: dtype must be float32 or bfloat16 (jnp.float32 or jnp.bfloat16, the "
            f"dtypes diffusers' checkpoints are released in), got {dtype!r}; use "
            "jnp.float32 for parity and identity checks, jnp.bfloat16 for large models."
        )
    return dtype
