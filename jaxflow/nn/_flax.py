"""Flax networks as the network of a `jf.LearnedField` or `jf.InterpolantField`.

`FlaxNNX` wraps an `nnx.Module`, `FlaxLinen` a linen module and its variables.
Each is an `eqx.Module` whose array leaves are exactly the Flax parameters, so
`jax.jit`, `jax.vmap`, forward-mode derivatives through the solvers and
`jf.train` (which partitions with `eqx.is_array`) see the network as they see
`jf.nn.MLP`. The Flax structure (the nnx graph definition, the linen module) is a
static field: under `jit` it is rebuilt around the traced parameters at trace
time, so the compiled program is the network's own arithmetic on the parameter
buffers, with no copy (see `FlaxNNX`).

Flax is an optional dependency: it is imported when a wrapper is built, not when
`jaxflow` or `jaxflow.nn` is.
"""

from collections.abc import Callable, Mapping
from typing import Any, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Real

from .._misc import check_network_input

_INSTALL = 'pip install "jaxflow[flax]"'


def _import(name: str, wrapper: str):
    try:
        if name == "nnx":
            from flax import nnx as module
        else:
            import flax.linen as module
    except ImportError as e:
        raise ImportError(
            f"{wrapper} needs flax, which is not installed: {_INSTALL} (or pip install flax)."
        ) from e
    return module


def _call(wrapper: str, fn, x, t):
    """`fn(x, t)` for one point `x` `(n,)` and a scalar `t`, checked to answer in
    `x`'s shape (a `ValueError` naming both shapes, at trace time)."""
    x = check_network_input(wrapper, x, t)
    out = fn(x, t)
    if jnp.shape(out) != x.shape:
        raise ValueError(
            f"{wrapper}: the network maps a point of shape {x.shape} to shape "
            f"{jnp.shape(out)}; a jaxflow network returns the point's shape (n,)."
        )
    return out


def _check_arrays(tree, what: str, wrapper: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not eqx.is_array(leaf):
            raise ValueError(
                f"{wrapper}: {what} {jax.tree_util.keystr(path)} is a "
                f"{type(leaf).__name__}, not an array: build the network with concrete "
                "parameters (not under nnx.eval_shape / jax.eval_shape)."
            )


def _not_parameters(what: str, found: list[str], wrapper: str) -> ValueError:
    return ValueError(
        f"{wrapper} wraps networks whose only state is their parameters, but this "
        f"{what} also holds {', '.join(found)}. A jaxflow network is a pure f(x, t): "
        "an update a call makes to such state (batch statistics, RNG counters) would "
        "be lost, and jf.train would differentiate it as if it were weights. Build "
        "the network without it (dropout without rngs, e.g. nnx.Dropout(rate) or "
        "nn.Dropout(rate, deterministic=True); LayerNorm or GroupNorm for BatchNorm), "
        "or copy its weights into an eqx.Module."
    )


@final
class FlaxNNX(eqx.Module):
    """A Flax `nnx.Module` `f(x, t) -> (n,)` as a jaxflow network:
    `jf.LearnedField(jf.nn.FlaxNNX(module), path, "velocity")`.

    The module is split once, here, by `nnx.split` into its graph definition (a
    static field: the module's structure and settings) and its parameters (an
    `nnx.State` of arrays, the pytree leaves that `jax.vmap` maps, `jax.jvp`
    differentiates and `jf.train` optimises). A call merges the two with
    `nnx.merge` and calls the result. Under `jit` the merge runs at trace time
    on the traced parameters and builds Python objects only, so no parameter is
    copied per call: the jaxpr of a call has the same primitives as an Equinox
    network with the same weights (no copy, no constants; `tests/nn/test_flax.py`
    checks it), the weights enter the compiled program as its parameters, and a
    jitted call runs as fast as the Equinox network's. Outside `jit`, the merged
    module holds the very arrays of `params` (`nnx.merge` does not copy).

    **Arguments:**

    - `module`: an `nnx.Module` whose `__call__(x, t)` maps a point `(n,)` and a
      scalar time to `(n,)` (for images, flatten inside the module). Its state
      must be `nnx.Param` variables only: batch statistics, RNG streams
      (`Dropout(rate, rngs=...)`) or other variables raise a `ValueError`, since
      a pure `f(x, t)` cannot carry their updates and `jf.train` would treat them
      as weights. Dropout built without `rngs` (deterministic) is fine.

    The module itself is not kept: `.module` merges a fresh one from the current
    parameters (after `jf.train`, the trained ones).

    **Raises:** `ImportError` without flax (`pip install "jaxflow[flax]"`);
    `ValueError` for a non-`nnx.Module`, non-parameter state, or abstract
    parameters; at call time, for `x` not one point `(n,)`, `t` not a scalar, or
    an output not of `x`'s shape.
    """

    graphdef: Any = eqx.field(static=True)
    params: Any

    def __init__(self, module: Any):
        nnx = _import("nnx", "FlaxNNX")
        if not isinstance(module, nnx.Module):
            hint = (
                " For a linen module use jf.nn.FlaxLinen(module, variables)."
                if hasattr(module, "apply") and hasattr(module, "init")
                else ""
            )
            raise ValueError(f"FlaxNNX needs a flax nnx.Module, got {type(module).__name__}.{hint}")
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        # flax < 0.11 holds a VariableState per variable, later ones the Variable
        others = jax.tree_util.tree_flatten_with_path(
            rest,
            is_leaf=lambda v: isinstance(v, nnx.Variable) or type(v).__name__ == "VariableState",
        )[0]
        if others:
            found = [
                f"{getattr(v, 'type', type(v)).__name__} at "
                f"{'.'.join(str(getattr(k, 'key', k)) for k in path)}"
                for path, v in others
            ]
            raise _not_parameters("nnx.Module", found, "FlaxNNX")
        _check_arrays(params, "parameter", "FlaxNNX")
        try:
            hash(graphdef)
        except TypeError as e:
            raise ValueError(
                f"FlaxNNX: the module's static attributes must be hashable (jit caches on "
                f"them): {e}. Store them as tuples, not lists or dicts."
            ) from e
        self.graphdef = graphdef
        self.params = params

    @property
    def module(self) -> Any:
        """The `nnx.Module` with the current parameters (shared, not copied)."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.params)

    def __call__(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """**Arguments:** a point `x` `(n,)` and a time `t`.

        **Returns:** `module(x, t)`, shape `(n,)`.
        """
        return _call("FlaxNNX", self.module, x, t)


@final
class FlaxLinen(eqx.Module):
    """A Flax linen module and its variables, `f(x, t) = module.apply(variables, x,
    t)`, as a jaxflow network: `jf.LearnedField(jf.nn.FlaxLinen(module,
    variables), path, "velocity")`.

    The variables (the pytree of arrays that `module.init` returned) are the
    wrapper's array leaves, which `jax.vmap` maps, `jax.jvp` differentiates and
    `jf.train` optimises; the module or apply function is a static field. Under
    `jit` `apply` runs at trace time on the traced variables, so the compiled
    program holds no copy of them.

    **Arguments:**

    - `apply_fn_or_module`: a `flax.linen.Module` whose `__call__(x, t)` maps a
      point `(n,)` and a scalar time to `(n,)`, or an apply function
      `apply(variables, x, t)` (e.g. `module.apply`, or a public model's own apply
      function). It must be hashable (`jit` caches on it).
    - `variables`: `{"params": ...}` as `module.init` returns it (a `FrozenDict` is
      unfrozen). Only the `"params"` collection is accepted: others
      (`"batch_stats"`, ...) raise a `ValueError`, since a pure `f(x, t)` cannot
      carry their updates and `jf.train` would treat them as weights.

    **Raises:** `ImportError` without flax (`pip install "jaxflow[flax]"`);
    `ValueError` for a module that is neither a linen module nor callable, for
    variables that are not `{"params": ...}` of arrays, or for an unhashable
    apply function; at call time, as `FlaxNNX`.
    """

    apply_fn: Callable = eqx.field(static=True)
    variables: dict

    def __init__(self, apply_fn_or_module: Any, variables: Mapping):
        linen = _import("linen", "FlaxLinen")
        nnx = _import("nnx", "FlaxLinen")
        if isinstance(apply_fn_or_module, nnx.Module):
            raise ValueError("FlaxLinen got an nnx.Module: use jf.nn.FlaxNNX(module).")
        if isinstance(apply_fn_or_module, linen.Module):
            apply_fn = apply_fn_or_module.apply
        elif callable(apply_fn_or_module):
            apply_fn = apply_fn_or_module
        else:
            raise ValueError(
                "FlaxLinen needs a flax.linen.Module or an apply function "
                f"apply(variables, x, t), got {type(apply_fn_or_module).__name__}."
            )
        try:
            hash(apply_fn)
        except TypeError as e:
            raise ValueError(
                f"FlaxLinen: the module or apply function must be hashable (jit caches on "
                f"it): {e}. Give the module tuple attributes, not lists or dicts."
            ) from e
        if not isinstance(variables, Mapping) or "params" not in variables:
            got = (
                f"a mapping with keys {sorted(variables)}"
                if isinstance(variables, Mapping)
                else type(variables).__name__
            )
            raise ValueError(
                "FlaxLinen needs the variables that module.init returned, "
                f'{{"params": ...}}; got {got}. If you hold the parameters alone, '
                'pass {"params": params}.'
            )
        extra = [f'the "{c}" collection' for c in variables if c != "params"]
        if extra:
            raise _not_parameters("module's variables dict", extra, "FlaxLinen")
        # a dict of the same arrays (a FrozenDict becomes a dict; nothing is copied)
        variables = {"params": _unfreeze(variables["params"])}
        _check_arrays(variables, "variable", "FlaxLinen")
        self.apply_fn = apply_fn
        self.variables = variables

    def __call__(self, x: Float[Array, " n"], t: Real[ArrayLike, ""]) -> Float[Array, " n"]:
        """**Arguments:** a point `x` `(n,)` and a time `t`.

        **Returns:** `apply(variables, x, t)`, shape `(n,)`.
        """
        return _call("FlaxLinen", lambda x, t: self.apply_fn(self.variables, x, t), x, t)


def _unfreeze(tree):
    """Nested mappings (`FrozenDict` included) as nested dicts, leaves shared."""
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree
