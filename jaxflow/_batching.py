"""Batching many points through adaptive solves."""

import os
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import check_positive_int, describe

# Points per chunk (or lanes) on one device when the caller gives none. CPU: a
# chunk of 256 vmapped solves fills the vector units and leaves the per-chunk
# overhead small (docs/batching.md: 64 to 512 measured on the paper 000 Fig. 3
# workload, within 1.5x of each other); accelerators need many more lanes to
# keep busy and have the memory for them.
_CHUNK = {"cpu": 256}
_ACCELERATOR_CHUNK = 4096


def use_cpu_devices(count: int | np.integer | None = None) -> int:
    """Split the CPU into `count` JAX devices (default: one per core), so that
    `batch_map` and `batch_generate` run on every core.

    XLA runs one program on one CPU device at a time, mostly on one core; with
    several host devices each runs its share of the points at once. This sets
    JAX's `jax_num_cpu_devices` (the same as
    `XLA_FLAGS=--xla_force_host_platform_device_count=N`); jaxflow never sets it
    on its own. Call it right after `import jax`, before any JAX operation.

    **Arguments:**

    - `count`: the number of CPU devices; `None` (default) for `os.cpu_count()`.

    **Returns:** the number of CPU devices asked for.

    **Raises:** `ValueError` for a `count` that is not a positive int, or when JAX
    has already started its backends (the device count is fixed by then).
    """
    count = (os.cpu_count() or 1) if count is None else check_positive_int("count", count)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:
        raise ValueError(
            "use_cpu_devices: JAX has already started (an array was made or a "
            "function run), and its device count is fixed; call "
            "jf.use_cpu_devices() right after `import jax`, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before "
            "Python starts."
        ) from error
    return count


def chunk_size(size: int, devices: int, backend: str | None = None, cap: int | None = None) -> int:
    """Points per chunk for `size` points over `devices` devices: each device's
    share in chunks of at most `cap` (default 256 on CPU, 4096 on an accelerator),
    made equal so that no chunk is mostly padding."""
    backend = jax.default_backend() if backend is None else backend
    cap = _CHUNK.get(backend, _ACCELERATOR_CHUNK) if cap is None else cap
    share = max(1, -(-size // max(devices, 1)))
    chunks = -(-share // cap)
    return -(-share // chunks)


def resolve_mesh(mesh, where: str) -> Mesh | None:
    """`mesh="auto"`: a flat mesh of every device of this process when it has more
    than one, else `None`; a `Mesh` is checked to hold this process's devices."""
    if isinstance(mesh, str) and mesh == "auto":
        local = jax.local_devices()
        return None if len(local) == 1 else Mesh(np.asarray(local), ("batch",))
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"{where}: mesh must be 'auto', None or a jax.sharding.Mesh, got {describe(mesh)}."
        )
    local = set(jax.local_devices())
    if not all(d in local for d in np.asarray(mesh.devices).reshape(-1)):
        raise ValueError(
            f"{where}: the mesh holds devices of other processes; give each process "
            "its share of the points and a mesh of jax.local_devices()."
        )
    return mesh


def leading_size(xs, where: str) -> int:
    """The common leading size of every leaf of `xs`; a `ValueError` naming the
    leaf otherwise."""
    leaves = jax.tree_util.tree_leaves_with_path(xs)
    if not leaves:
        raise ValueError(f"{where}: xs holds no arrays to map over.")
    sizes = {}
    for path, leaf in leaves:
        name = f"xs{jax.tree_util.keystr(path)}"
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"{where}: every leaf of xs needs a leading batch axis; {name} is a "
                f"scalar ({describe(leaf)})."
            )
        sizes.setdefault(jnp.shape(leaf)[0], name)
    if len(sizes) > 1:
        found = ", ".join(f"{n} in {name}" for n, name in sizes.items())
        raise ValueError(
            f"{where}: every leaf of xs must hold the same number of points (leading "
            f"axis); got {found}."
        )
    return next(iter(sizes))


def batch_map(
    fn: Callable,
    xs: PyTree[ArrayLike],
    *,
    batch_size: int | np.integer | None = None,
    mesh: Mesh | Literal["auto"] | None = "auto",
) -> PyTree[Array]:
    """`jax.vmap(fn)(xs)` computed in chunks, on every device of this process.

    A vmapped adaptive solve runs every lane until the slowest lane finishes
    (docs/batching.md: on the paper 000 Fig. 3 grid the median point needs 18
    steps, the worst 45). Chunking keeps a hard point from stalling the whole
    batch: each chunk is one `vmap`, the chunks run in a `lax.map` (no Python
    loop). On that grid (2 cores, float64) this is about 2.7x faster than one
    `vmap` over 40,401 points. Results equal `jax.vmap(fn)(xs)`. For solves of the
    PF-ODE, `jf.batch_generate` also refills finished lanes.

    The points are spread over the devices of a mesh: each device maps its share
    in chunks as above (`jax.shard_map`, the batch axis split over every device
    of the mesh, whatever its shape or axis types), and whatever `fn` closes over
    (a field's weights) is replicated. `N` is padded to a multiple of the device
    count with copies of the last point, whose results are dropped. Points are
    independent, so no device waits on another's solves; the slowest device sets
    the time. One CPU is one device unless asked otherwise:
    `jf.use_cpu_devices()` makes one per core.

    **Arguments:**

    - `fn`: a function of one point (pytree) with a leading batch axis mapped over.
    - `xs`: the points, stacked along the leading axis: every leaf an array with
      the same leading size `N`.
    - `batch_size`: points per chunk (a trailing partial chunk is handled), per
      device; `None` (default) chooses from `N` and the device count
      (`jf.chunk_size`: chunks of at most 256 on CPU, 4096 on an accelerator,
      equal in size).
    - `mesh`: `'auto'` (default): every device of this process (`jax.local_devices()`),
      or the default device alone when there is one. A `jax.sharding.Mesh` spreads
      the batch over its devices (e.g. `jax.make_mesh((4,), ("batch",))`); `None`
      keeps it on the default device. Over several hosts, give each process its
      share of the points and a mesh of its local devices, as
      `examples/large_model_reconstruction.py --distributed` does. Inside a
      function that is itself mapped over devices (`jax.shard_map`), pass `None`.

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
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
    size = leading_size(xs, "batch_map")
    mesh = resolve_mesh(mesh, "batch_map")
    devices = 1 if mesh is None else mesh.devices.size
    if batch_size is None:
        batch_size = chunk_size(size, devices)

    def block(chunk):
        share = jax.tree_util.tree_leaves(chunk)[0].shape[0]
        return jax.lax.map(fn, chunk, batch_size=max(1, min(batch_size, share)))

    if mesh is None or size == 0:
        return block(xs)
    return shard_blocks(block, xs, mesh, size)


def shard_blocks(block: Callable, xs, mesh: Mesh, size: int):
    """`block` (a function of a stack of points, returning stacks) on each
    device's share of `xs` over the flattened `mesh`, the outputs gathered back in
    order."""
    devices = np.asarray(mesh.devices).reshape(-1)
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

    def sharded(xs):
        # check_vma=False: diffrax's while loops carry unvarying zeros beside varying
        # states, which the check rejects though every device runs independently
        out = jax.shard_map(block, mesh=flat, in_specs=spec, out_specs=spec, check_vma=False)(
            jax.tree_util.tree_map(place, xs)
        )
        return jax.tree_util.tree_map(lambda a: a[:size], out)

    # One program when called eagerly too: an eager shard_map runs its body op by op,
    # hundreds of small compiles for one solve. Under an outer jit this is inlined.
    return jax.jit(sharded)(xs)
