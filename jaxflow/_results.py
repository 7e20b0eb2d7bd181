"""Per-point outcomes, for sweeps where one bad point must not cost the batch.

Every solving and analysis entry point raises by default (through `eqx.error_if`,
so also under `jit` and `vmap`). With `throw=False` it returns an `Outcome`
instead: the value, NaN where no value exists, and a `RESULTS` item saying what
happened to that point, as diffrax's `diffeqsolve(..., throw=False)` does.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, PyTree


class RESULTS(diffrax.RESULTS):  # pyright: ignore
    """What happened to one point: diffrax's outcomes of a solve (`successful`,
    `max_steps_reached`, ...) and jaxflow's own.

    Compare items with `==` (`outcome.result == jf.RESULTS.successful`, elementwise
    for a batch); printing an item shows its message.
    """

    invalid_input = (
        "The input point contains NaN or inf, or a time lies outside the path's "
        "range [t_data, t_noise]."
    )
    non_finite = (
        "The result is not finite: the field is singular on this span or the step is too large."
    )
    singular_field = (
        "The solve failed and the span ends where the field is singular (an "
        "Empirical law at t = 0, a noise-predicting network where alpha = 0): stop "
        "short of that end with t_data= or t_noise=."
    )
    field_non_finite = (
        "The field's velocity is NaN or inf at the starting point (a network or law "
        "returning NaN there, or parameters that are not finite)."
    )


class Outcome(eqx.Module):
    """A value with its per-point status, returned by the entry points called with
    `throw=False`.

    - `value`: what the entry point returns with `throw=True`; NaN where the
      status is not `successful` (and NaN tangents, so a JVP through a failed
      point is NaN too, not a silent zero).
    - `result`: a `jf.RESULTS` item (batched like `value` under `vmap`).
    """

    value: PyTree[Array]
    result: RESULTS

    @property
    def ok(self) -> Bool[Array, "..."]:
        """True where the point succeeded."""
        return self.result == RESULTS.successful


def result_messages(result) -> np.ndarray:
    """What happened to each point of a concrete `RESULTS` (as returned in an
    `Outcome`, batched or not), as text: a NumPy array of strings of the result's
    shape, `""` where the point succeeded (a `ValueError` for anything else). For
    logs and records written as a sweep goes; call it outside `jit`."""
    if not isinstance(result, RESULTS):
        raise ValueError(f"result_messages takes a jf.RESULTS, got {type(result).__name__}.")
    codes = np.asarray(result._value)
    messages = {int(code): RESULTS._index_to_message[int(code)] for code in np.unique(codes)}
    messages[int(RESULTS.successful._value)] = ""
    out = np.empty(codes.shape, dtype=object)
    for code, message in messages.items():
        out[codes == code] = message
    return out


def all_finite(tree) -> Bool[Array, ""]:
    """True when every leaf of `tree` is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


def classify(value, result: RESULTS = RESULTS.successful, input_ok=None) -> RESULTS:
    """The status of one point: `result` (a solver's own, promoted to `RESULTS`),
    else `invalid_input` where `input_ok` is False, else `non_finite` where `value`
    is not finite."""
    if input_ok is not None:
        result = RESULTS.where(input_ok, result, RESULTS.invalid_input)
    return RESULTS.where(
        (result == RESULTS.successful) & ~all_finite(value), RESULTS.non_finite, result
    )


def mask_failed(tree, ok):
    """NaN where not `ok`, in primal and tangent alike (a `where` would give a zero
    tangent at a failed point)."""

    def mask(a):
        if not jnp.issubdtype(a.dtype, jnp.inexact):
            return a
        return a * jnp.where(ok, jnp.ones((), a.dtype), jnp.full((), jnp.nan, a.dtype))

    return jax.tree_util.tree_map(mask, tree)


def first_failure(*results: RESULTS) -> RESULTS:
    """The first result that is not `successful` (for chained solves), else
    `successful`."""
    out = RESULTS.successful
    for r in reversed(results):
        out = RESULTS.where(r == RESULTS.successful, out, r)
    return out
