"""The Jacobian of a map as a pair of linear functions, `v -> J v` and
`u -> J^T u`, and the generation map as a map with both modes.

A diffrax solve is differentiable forwards with `ForwardMode` and backwards with
`RecursiveCheckpointAdjoint`, never both at once (a `custom_vjp` has no JVP rule,
and a `while_loop` cannot be transposed). `GenerationMap` carries the settings of
one solve and runs it under either adjoint, so that the analyses here choose the
adjoint per product and `jf.generate`'s forward-mode default stays.
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._fields import AbstractVelocityField
from .._misc import as_point, check_bool, check_map_output, check_positive_int, describe
from .._solve import check_pf_ode_settings, generate, invert


class GenerationMap(eqx.Module):
    """The generation map `z -> G(z)` (or, with `inverse=True`, the inversion
    `x -> G^{-1}(x)`) of one field and one set of solver settings, callable as a
    map of one point, with a reverse-mode twin for VJPs.

    Build it with `jf.generation_map`. Calling it solves with `jf.generate`'s
    forward-mode adjoint (`jax.jvp`, `jax.linearize` work); `reverse(z)` solves
    with `diffrax.RecursiveCheckpointAdjoint(checkpoints)` (`jax.vjp`,
    `jax.grad` work, in memory bounded by `checkpoints` saved states). It is a
    pytree: pass it as an argument to compiled code (`jax.jit` or
    `eqx.filter_jit`): the field's arrays and any traced setting are leaves; the
    other settings (`solver`, `steps`, tolerances, a `times` grid, which must stay
    concrete) are static.
    """

    field: AbstractVelocityField
    settings: tuple = eqx.field(static=True)
    arrays: dict
    inverse: bool = eqx.field(static=True)
    checkpoints: int | None = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.field, AbstractVelocityField):
            raise ValueError(f"generation_map needs a jaxflow field, got {describe(self.field)}.")
        for name in ("adjoint", "throw"):
            if name in self.solve_kwargs:
                raise ValueError(
                    f"generation_map chooses {name}= itself (forward mode for JVPs, "
                    "checkpointed reverse mode for VJPs, throw=True); leave it out."
                )
        # the checks jf.generate makes before it solves, made now: a bad setting is
        # refused when the map is built, not at its first call
        check_pf_ode_settings(
            self.field, "invert" if self.inverse else "generate", self.solve_kwargs
        )

    @property
    def solve_kwargs(self) -> dict:
        """The solver settings, as for `jf.generate`."""
        static = {k: v.array if isinstance(v, _Grid) else v for k, v in self.settings}
        return {**static, **self.arrays}

    def _solve(self, z, adjoint):
        solve = invert if self.inverse else generate
        return solve(self.field, z, adjoint=adjoint, **self.solve_kwargs)

    def __call__(self, z: Float[ArrayLike, " n"]) -> Float[Array, " n"]:
        return self._solve(z, None)

    def reverse(self, z: Float[ArrayLike, " n"]) -> Float[Array, " n"]:
        """The same map, solved so that reverse mode (`jax.vjp`) goes through it."""
        return self._solve(z, diffrax.RecursiveCheckpointAdjoint(checkpoints=self.checkpoints))


def generation_map(
    field: AbstractVelocityField,
    *,
    inverse: bool = False,
    checkpoints: int | None = None,
    **solve_kwargs,
) -> GenerationMap:
    """The generation map `G` (or `G^{-1}` with `inverse=True`) as a map of one
    point that the matrix-free analyses can differentiate both ways.

    **Arguments:**

    - `field`: any jaxflow field.
    - `inverse`: `False` (default) for `G`, noise to data; `True` for `G^{-1}`,
      data to noise (whose Jacobian at `G(z)` is `J_G(z)^{-1}`: the route to the
      smallest singular values of `J_G`).
    - `checkpoints`: states saved by the reverse-mode solve
      (`diffrax.RecursiveCheckpointAdjoint`); `None` lets diffrax choose (about
      `log(steps)`-fold recomputation). Fewer checkpoints, less memory, more
      recomputation.
    - `**solve_kwargs`: as for `jf.generate` (`solver`, `steps`, `times`, `rtol`,
      ...), except `adjoint` and `throw`, which the map chooses.

    **Returns:** a `GenerationMap`: `G(z)` when called, `G.reverse(z)` for VJPs.

    **Raises:** `ValueError` for a non-field, `adjoint=` or `throw=`,
    `checkpoints` not a positive int, or a setting that `jf.generate` would refuse
    (an unknown solver or keyword, `steps=0`, a fixed-step solver without `steps`,
    ...), checked here, when the map is built.
    """
    if not isinstance(field, AbstractVelocityField):
        raise ValueError(f"generation_map needs a jaxflow field, got {describe(field)}.")
    if checkpoints is not None:
        checkpoints = check_positive_int("checkpoints", checkpoints)
    # a concrete grid (`times`, NumPy or JAX) must stay concrete under jit: static,
    # hashed by value; a traced value (a tolerance under jit) is a leaf
    arrays = {k: v for k, v in solve_kwargs.items() if isinstance(v, jax.core.Tracer)}
    settings = tuple(
        sorted(
            (k, _Grid(v) if isinstance(v, (np.ndarray, jax.Array, list, tuple)) else v)
            for k, v in solve_kwargs.items()
            if k not in arrays
        )
    )
    try:
        hash(settings)
    except TypeError as e:
        raise ValueError(
            f"generation_map: every setting must be an array or hashable; {e}."
        ) from None
    return GenerationMap(field, settings, arrays, check_bool("inverse", inverse), checkpoints)


class _Grid:
    """A NumPy array as a static setting: equal and hashed by value."""

    def __init__(self, value):
        self.array = np.asarray(value)
        self._key = (self.array.dtype.str, self.array.shape, self.array.tobytes())

    def __eq__(self, other):
        return isinstance(other, _Grid) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


Map = Callable[[Float[Array, " n"]], Float[Array, " n"]]


def jacobian_products(fn: Map, x: Float[ArrayLike, " n"], where: str):
    """`(fn(x), jvp, vjp)` with `jvp(v) = J v` and `vjp(u) = J^T u`, `J = J_fn(x)`,
    for one point `x` (checked: one finite point, and `fn(x)` of its shape).

    A `GenerationMap` gives its JVPs by forward mode and its VJPs through
    `reverse`; any other `fn` is linearised once (`jax.linearize`) and the VJP is
    the transpose of that linearisation, so no product re-runs `fn`'s primal.
    """
    x = as_point("x", x, where)
    if isinstance(fn, GenerationMap):
        y, jvp = jax.linearize(fn, x)
        _, vjp_fn = jax.vjp(fn.reverse, x)

        def vjp(u):
            return vjp_fn(u)[0]
    else:
        if not callable(fn):
            raise ValueError(f"{where}: fn must be a map of one point, got {describe(fn)}.")
        y, jvp = jax.linearize(fn, x)
        transpose = jax.linear_transpose(jvp, x)

        def vjp(u):
            try:
                return transpose(u)[0]
            except (ValueError, RuntimeError) as e:
                if "reverse-mode differentiation" not in str(e).lower():
                    raise
                raise ValueError(_no_reverse_mode(where)) from e

    check_map_output(where, "fn", jnp.shape(y), x)
    return y, jvp, vjp


def _no_reverse_mode(where: str) -> str:
    """The advice when `fn`'s linearisation cannot be transposed: a `lax.while_loop`
    inside, most often `jf.generate`'s forward-mode solve."""
    return (
        f"{where}: fn cannot be differentiated in reverse mode, which the products "
        "J^T u need (see the chained error): it runs a lax.while_loop, e.g. a "
        "jf.generate or jf.invert solve, whose default adjoint is forward mode only. "
        "Pass the generation map as fn=jf.generation_map(field, solver=..., ...) "
        "(inverse=True for jf.invert): it solves forwards for J v and with a "
        "checkpointed reverse solve for J^T u. Another map must be differentiable in "
        "reverse mode (jax.vjp), e.g. a lax.scan instead of a while_loop."
    )
