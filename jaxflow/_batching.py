"""Batching many points through adaptive solves."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import check_positive_int, describe


def batch_map(
    fn: Callable,
    xs: PyTree[ArrayLike],
    *,
    batch_size: int | np.integer = 256,
    mesh: Mesh | None = None,
) -> PyTree[Array]:
    """`jax.vmap(fn)(xs)` computed in chunks of `batch_size` points.

    A vmapped adaptive solve runs every lane until the slowest lane finishes
    (docs/mathematics.md §7: on the paper 000 Fig. 3 grid the median point needs 18 steps, the
    worst 45). Chunking keeps a hard point from stalling the whole batch: each
    chunk is one `vmap`, the chunks run in a `lax.map` (no Python loop). On that
    grid (2 cores, float64) this is about 2.7x faster than one `vmap` over 40,401 points
    at `batch_size=256`; very small chunks lose vectorisation, very large ones the
    benefit. Results equal `jax.vmap(fn)(xs)`.

    With a `mesh`, the points are spread over its devices: each device maps its
    share in chunks as above (`jax.shard_map`, the batch axis split over every
    device of the mesh, whatever its shape or axis types), and whatever `fn`
    closes over (a field's weights) is replicated. `N` is padded to a multiple of
    the device count with copies of the last point, whose results are dropped.
    Points are independent, so no device waits on another's solves; the slowest
    device sets the time.

    **Arguments:**

    - `fn`: a function of one point (pytree) with a leading batch axis mapped over.
    - `xs`: the points, stacked along the leading axis: every leaf an array with
      the same leading size `N`.
    - `batch_size`: points per chunk (a trailing partial chunk is handled); with a
      `mesh`, per device.
    - `mesh`: a `jax.sharding.Mesh` to spread the batch over (e.g.
      `jax.make_mesh((jax.device_count(),), ("batch",))`); on a CPU, forced host
      devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`) are devices
      too. `None` (default): the default device. Its devices must belong to this
      process; over several hosts, give each process its share of the points and
      a mesh of its local devices (`jax.local_devices()`), as
      `examples/large_model_reconstruction.py --distributed` does.

    **Returns:** the stacked outputs, as `jax.vmap(fn)(xs)`. An empty batch
    (`N = 0`) gives empty outputs of the right shapes, as `jax.vmap` does (`fn` is
    traced, not run).

    **Raises:** `ValueError` for a `fn` that is not callable, `batch_size` not a
    positive int, `xs` without arrays, a leaf without a leading axis, leaves of
    different leading sizes, or a `mesh` that is not a `jax.sharding.Mesh` of this
    process's devices.
    """
    if not callable(fn):
        raise ValueError(f"batch_map: fn must be a function of one point, got {describe(fn)}.")
    batch_size = check_positive_int("batch_size", batch_size)
    leaves = jax.tree_util.tree_leaves_with_path(xs)
    if not leaves:
        raise ValueError("batch_map: xs holds no arrays to map over.")
    sizes = {}
    for path, leaf in leaves:
        where = f"xs{jax.tree_util.keystr(path)}"
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"batch_map: every leaf of xs needs a leading batch axis; {where} is a "
                f"scalar ({describe(leaf)})."
            )
        sizes.setdefault(jnp.shape(leaf)[0], where)
    if len(sizes) > 1:
        found = ", ".join(f"{n} in {where}" for n, where in sizes.items())
        raise ValueError(
            f"batch_map: every leaf of xs must hold the same number of points (leading "
            f"axis); got {found}."
        )
    if mesh is not None:
        return _sharded_map(fn, xs, batch_size, mesh, next(iter(sizes)))
    return jax.lax.map(fn, xs, batch_size=batch_size)


def _sharded_map(fn, xs, batch_size, mesh, size):
    if not isinstance(mesh, Mesh):
        raise ValueError(f"batch_map: mesh must be a jax.sharding.Mesh, got {describe(mesh)}.")
    devices = np.asarray(mesh.devices).reshape(-1)
    local = set(jax.local_devices())
    if not all(d in local for d in devices):
        raise ValueError(
            "batch_map: the mesh holds devices of other processes; give each process "
            "its share of the points and a mesh of jax.local_devices()."
        )
    if size == 0:
        return jax.lax.map(fn, xs, batch_size=batch_size)
    # One flat axis over every device, with automatic axis types whatever the
    # user's mesh has: slicing the padding off an explicitly sharded axis would
    # need an output sharding for every leaf.
    flat = Mesh(devices, ("batch",), axis_types=(AxisType.Auto,))
    per_device = -(-size // devices.size)
    pad = per_device * devices.size - size
    spec = P("batch")
    sharding = NamedSharding(flat, spec)

    def place(leaf):
        leaf = jnp.asarray(leaf)
        if pad:
            leaf = jnp.concatenate([leaf, jnp.repeat(leaf[-1:], pad, axis=0)])
        return jax.lax.with_sharding_constraint(leaf, sharding)

    def local_map(chunk):
        return jax.lax.map(fn, chunk, batch_size=min(batch_size, per_device))

    # check_vma=False: diffrax's while loops carry unvarying zeros beside varying
    # states, which the check rejects though every device runs independently
    out = jax.shard_map(local_map, mesh=flat, in_specs=spec, out_specs=spec, check_vma=False)(
        jax.tree_util.tree_map(place, xs)
    )
    return jax.tree_util.tree_map(lambda a: a[:size], out)
