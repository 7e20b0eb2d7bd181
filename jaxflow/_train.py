"""A training loop for learned fields: optax, one jit-compiled step per call, an
exponential moving average of the weights, and orbax checkpoints that a killed
run resumes from exactly.

Exact resumption holds because nothing of a step depends on how the run was cut
into chunks: step `i` draws its batch and its loss randomness from
`fold_in(key, i)`, and the checkpoint holds the weights, the EMA, the optimiser
state, the step and the key (the PRNG state of every later step).
"""

import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree

from ._misc import check_positive_int


@final
class TrainState(eqx.Module):
    """The state of a training run between two steps: what the next step needs
    besides the data, the key and the settings.

    - `params`: the model's arrays, `eqx.partition(model, eqx.is_array)[0]`. The rest
      of the model never changes, so it is not carried:
      `eqx.combine(state.params, static)` is the model.
    - `ema`: the exponential moving average of `params`, of the same structure.
    - `opt_state`: the optimiser state.
    - `step`: `()` integer array, the steps taken, which is also the index of the
      next step. An array rather than an `int`, so that the compiled step takes and
      returns a `TrainState` without being recompiled for every step.

    The checkpoints that `train` writes hold all of it (`step` as the checkpoint's
    number), so a run resumed from one carries on with an equal state.
    """

    params: PyTree
    ema: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]


class TrainResult(eqx.Module):
    """What `train` returns.

    - `model`: the trained network; `ema`: its exponential moving average (use it
      for sampling).
    - `opt_state`: the optimiser state; `step`: steps taken in total.
    - `losses`: `(steps this call,)` the loss of every step this call ran.
    - `state`: the final `TrainState`, built from the fields above (the same
      arrays, not a second copy in the pytree).
    """

    model: eqx.Module
    ema: eqx.Module
    opt_state: optax.OptState
    step: int
    losses: Float[Array, " steps"]

    @property
    def state(self) -> TrainState:
        """The final `TrainState`: what a run resumed from its last checkpoint
        starts from."""
        return TrainState(
            eqx.filter(self.model, eqx.is_array),
            eqx.filter(self.ema, eqx.is_array),
            self.opt_state,
            jnp.asarray(self.step),
        )


def _checkpoint_manager(directory):
    """`(orbax.checkpoint, manager)` for `directory`, keeping the last two
    checkpoints. Orbax is imported here, as only runs that checkpoint need it (its
    import takes about 0.25 s after JAX's)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp, ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save(ocp, manager, state: TrainState, config: dict) -> None:
    """Write `state` as checkpoint number `state.step`, with `config` and the step in
    its JSON item. Synchronous: once it returns the checkpoint is complete, which is
    what a later run (or the error on a non-finite loss) relies on."""
    step = int(state.step)
    # weights and optimiser state are separate items, so that the weights can be
    # read back without knowing the optimiser
    manager.save(
        step,
        args=ocp.args.Composite(
            weights=ocp.args.StandardSave((state.params, state.ema)),
            optimiser=ocp.args.StandardSave(state.opt_state),
            config=ocp.args.JsonSave(dict(config, step=step)),
        ),
    )
    manager.wait_until_finished()


def _restore(ocp, manager, step, weights, opt_state=None):
    """Checkpoint `step`'s weights and config, and its optimiser state if
    `opt_state` is given; the templates give orbax the structures, shapes and
    dtypes to restore to."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
    items = dict(weights=ocp.args.StandardRestore(abstract(weights)), config=ocp.args.JsonRestore())
    if opt_state is not None:
        items["optimiser"] = ocp.args.StandardRestore(abstract(opt_state))
    return manager.restore(step, args=ocp.args.Composite(**items))


class _Unrestorable(Exception):
    """A checkpoint step that cannot be read back (damaged, empty, or holding NaN),
    raised `from` its cause. Private: `_restore_newest` catches it to try an older
    step, and no caller outside sees it."""


def _key_str(key) -> str:
    """One key of a pytree path, written the same for a template and for orbax's
    metadata of the saved tree: `[i]` for a sequence item, `.name` for an attribute
    or a dict key (orbax stores a module's or a namedtuple's fields as dict keys)."""
    if isinstance(key, jax.tree_util.SequenceKey):
        return f"[{key.idx}]"
    return f".{getattr(key, 'name', getattr(key, 'key', key))}"


def _leaf_shapes(tree) -> dict:
    """`{path: shape}` over the leaves of `tree` (arrays, shape structs or orbax's
    `ArrayMetadata`), each path a tuple of `_key_str`s. An empty node (`None`, an
    optimiser's `EmptyState`) counts as a leaf of shape `None`: orbax keeps those
    nodes and refuses a tree that has more or fewer of them."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: not jax.tree.leaves(x))
    return {
        tuple(map(_key_str, path)): (
            tuple(getattr(leaf, "shape", ())) if jax.tree.leaves(leaf) else None
        )
        for path, leaf in flat
    }


def _tree_difference(saved, template, what: str, this: str, drop: int = 0) -> str | None:
    """How orbax's metadata `saved` of a checkpoint item differs from the `template`
    it would be restored into, in words naming the first differing leaf (its path
    and both shapes); `None` when they agree.

    **Arguments:** `what`, `this`: the item's names in the words ("a model", "this
    model"); `drop`: leading path keys left out of them (`1` for the weights item, a
    `(model, EMA)` pair).
    """
    have, want = _leaf_shapes(saved), _leaf_shapes(template)
    paths = [*want, *(p for p in have if p not in want)]
    differing = [p for p in paths if have.get(p, ...) != want.get(p, ...)]
    if not differing:
        return None
    # an array leaf names the difference better than an empty node (an EmptyState)
    path = next((p for p in differing if (have.get(p), want.get(p)) != (None, None)), differing[0])
    name = "".join(path[drop:]).lstrip(".") or "(root)"
    if path not in have:
        return f"{what} without the leaf `{name}` of {this}"
    if path not in want:
        return f"{what} with a leaf `{name}` that {this} lacks"
    words = lambda s: "empty" if s is None else f"of shape {s}"  # noqa: E731
    return f"{what} whose leaf `{name}` is {words(have[path])}; {this}'s is {words(want[path])}"


def _check_restored(restored, with_optimiser: bool) -> None:
    """Refuse restored values that no run could have saved: non-finite weights or
    optimiser state (`train` never saves past a non-finite loss), or a config that
    is not a JSON object.

    **Raises:** `ValueError` naming what is wrong.
    """
    trees = dict(weights=restored.weights)
    if with_optimiser:
        trees["optimiser state"] = restored.optimiser
    for name, tree in trees.items():
        if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)):
            raise ValueError(f"its {name} hold NaN or inf")
    if not isinstance(restored.config, dict):
        raise ValueError(f"its config is a {type(restored.config).__name__}, not a JSON object")


def _read_step(ocp, manager, directory, step, weights, opt_state=None):
    """Checkpoint `step` restored into the templates (as `_restore`), after checking
    that it was written for this model (and this optimiser, if `opt_state` is given).

    **Raises:** `ValueError` when the saved trees differ from the templates: the
    user's error, which an older step of the same run shares; `_Unrestorable` when
    the step cannot be read or holds non-finite values.
    """
    item = lambda name: ocp.StandardCheckpointHandler().metadata(  # noqa: E731
        manager.directory / str(step) / name
    )
    try:
        saved_weights = item("weights")
        saved_opt = None if opt_state is None else item("optimiser")
    except Exception as e:  # orbax and TensorStore raise many types for a damaged file
        raise _Unrestorable() from e
    difference = _tree_difference(saved_weights.tree, weights, "a model", "this model", drop=1)
    fix = "pass the same architecture, or a new checkpoint_dir"
    if difference is None and opt_state is not None:
        difference = _tree_difference(
            saved_opt.tree, opt_state, "an optimiser state", "this optimiser's state"
        )
        fix = "pass the optimiser that run was started with, or a new checkpoint_dir"
    if difference is not None:
        raise ValueError(f"the checkpoint in {directory} holds {difference}: {fix}.")
    try:
        restored = _restore(ocp, manager, step, weights, opt_state)
        _check_restored(restored, opt_state is not None)
    except Exception as e:
        raise _Unrestorable() from e
    return restored


def _one_line(error: BaseException) -> str:
    """The root cause of `error` as `Type: first line`: orbax raises a bare
    `Exception` `from` TensorStore's error, which is the one that names the damaged
    file. TensorStore's spec that ends its line is cut, the rest to 200 characters."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    text = f"{type(error).__name__}: {first}"
    return text if len(text) <= 200 else text[:199] + "…"


def _restore_newest(ocp, manager, directory, weights, opt_state=None):
    """The newest checkpoint step in `manager` that restores (see `_read_step`),
    trying the steps newest first.

    **Returns:** `(step, restored, failures)`: `failures` lists `(step, cause)` for
    each newer step that did not restore; `(None, None, [])` when there is no step.

    **Raises:** `ValueError` when no step restores, naming each step and its cause;
    the `ValueError` of `_read_step` when the checkpoint was written for another
    model or optimiser.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, _read_step(ocp, manager, directory, step, weights, opt_state), failures
        except _Unrestorable as e:
            failures.append((step, e.__cause__))
    if not failures:
        return None, None, []
    causes = "; ".join(f"step {s}: {_one_line(e)}" for s, e in failures)
    raise ValueError(
        f"no checkpoint in {directory} restores (steps {', '.join(str(s) for s, _ in failures)} "
        f"tried, newest first): {causes}. Move the damaged step folders out of {directory} "
        "to start afresh there, or use a new checkpoint_dir."
    )


def _fallback_message(directory, failures, step) -> str:
    """The warning's text when `_restore_newest` skipped `failures` to use `step`."""
    skipped = "; ".join(f"step {s} does not restore ({_one_line(e)})" for s, e in failures)
    return f"jaxflow: in {directory}, {skipped}; using step {step}, the newest that does."


def _check_arguments(
    model, loss_fn, data, key, steps, batch_size, chunk, checkpoint_every, ema_decay
):
    """Check `train`'s arguments before anything is compiled or written.

    **Returns:** `(data, steps, batch_size, chunk, checkpoint_every)`: the data as a
    JAX array and the counts as `int`s.

    **Raises:** `ValueError` naming the first bad argument.
    """
    data = jnp.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must be (N, n) points, got shape {data.shape}.")
    if not jnp.all(jnp.isfinite(data)):
        raise ValueError("data contains NaN or inf.")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    chunk = check_positive_int("chunk", chunk)
    checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}.")
    try:
        # shapes only: an eager evaluation of a UNet loss would take seconds
        probe = eqx.filter_eval_shape(loss_fn, model, data[: min(2, len(data))], key)
    except Exception as e:
        raise ValueError(f"loss_fn failed on a batch of data of shape {data[:2].shape}: {e}") from e
    if probe.shape != ():
        raise ValueError(f"loss_fn must return a scalar, got shape {probe.shape}.")
    return data, steps, batch_size, chunk, checkpoint_every


def _key_json(key: PRNGKeyArray) -> list:
    """The key's raw data as nested lists, for the checkpoint's JSON config (a typed
    key, from `jax.random.key`, is stored as its `key_data`)."""
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.asarray(key_data).tolist()


_RESERVED = ("step", "prng_key")  # the keys train writes into a checkpoint's config


def _check_config(config: dict | None, batch_size: int) -> dict:
    """Check `train`'s `config` before any step: otherwise the first save, after
    `checkpoint_every` steps of compute, would be the first to fail.

    **Returns:** the config as a new dict (`{}` for `None`).

    **Raises:** `ValueError` when `config` is not a dict, uses a reserved key
    (`step`, `prng_key`: `train` writes them, and would overwrite the user's value
    silently), gives a `batch_size` other than `train`'s (`train` writes its own; the
    same value, a run's settings as a user records them, is accepted), has a key
    that is not a string, or a value that is not JSON (naming its key and type).
    """
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got a {type(config).__name__}.")
    reserved = [k for k in _RESERVED if k in config]
    if reserved:
        raise ValueError(
            f"config uses the reserved key(s) {reserved}: train writes them into each "
            "checkpoint. Rename them, or drop them from a config read by jf.load_checkpoint."
        )
    if config.get("batch_size", batch_size) != batch_size:
        raise ValueError(
            f"config['batch_size'] is {config['batch_size']!r}, but batch_size={batch_size}: "
            "train records the batch_size it trains with in each checkpoint. Drop the key "
            "from config, or pass batch_size=config['batch_size']."
        )
    for key, value in config.items():
        if not isinstance(key, str):  # JSON would turn it into a string, unsaid
            raise ValueError(f"config keys must be strings, got {key!r}.")
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"config[{key!r}] (a {type(value).__name__}) is not JSON ({e}): pass plain "
                "Python values (float(x), x.tolist(), str(x))."
            ) from e
    return dict(config)


def _check_checkpoint_dir(directory: str) -> None:
    """Make sure that `train` can write its checkpoints in `directory`, creating it
    if needed, before any step: otherwise the first save would be the first to fail.

    **Raises:** `ValueError` when `directory` is a file or cannot be written.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"checkpoint_dir {directory} is a file, not a directory.")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):  # the one honest test of writing
            pass
    except OSError as e:
        raise ValueError(
            f"checkpoint_dir {directory} cannot be written ({e.strerror or e}): pass a "
            "writable directory."
        ) from e


def _check_same_run(saved: dict, config: dict, checkpoint_dir) -> None:
    """Refuse to resume a checkpoint (its JSON config `saved`) that a run with
    another key or batch size wrote: its steps drew other batches, so carrying on
    with this run's `config` would continue neither run, and the result would match
    no straight run. A checkpoint without the record (one written before `train`
    recorded `batch_size`) is resumed unchecked for it, and the checkpoints this run
    writes record it.

    **Raises:** `ValueError` naming the checkpoint's value, this run's, and the fix.
    """
    saved_key = saved.get("prng_key")
    if saved_key is not None and saved_key != config["prng_key"]:
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} was written by a run with key data "
            f"{saved_key}, not {config['prng_key']}: resuming with another key would "
            "not continue that run. Pass its key, or start in a new checkpoint_dir."
        )
    saved_batch = saved.get("batch_size")
    if saved_batch is not None and saved_batch != config["batch_size"]:
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} was written by a run with "
            f"batch_size={saved_batch}, not {config['batch_size']}: its steps drew batches "
            f"of {saved_batch}, so resuming with another batch size would not continue "
            f"that run. Pass batch_size={saved_batch}, or start in a new checkpoint_dir."
        )


def _restore_or_init(params, optimiser, ocp, manager, checkpoint_dir, config):
    """The state to start from: the newest checkpoint in `manager` that restores, if
    there is one, else step 0 (weights `params`, the EMA equal to them, a fresh
    optimiser state).

    **Returns:** `(state, failures)`: the `TrainState`, and the `(step, cause)` of
    each newer checkpoint that did not restore.

    **Raises:** `ValueError` when the checkpoint was written with another key or
    batch size (`_check_same_run`), for another model or optimiser, or when no
    checkpoint restores (`_restore_newest`).
    """
    fresh = TrainState(params, params, optimiser.init(params), jnp.asarray(0))
    if manager is None:
        return fresh, []
    # the fresh state is the template: orbax restores to its structure and dtypes
    latest, restored, failures = _restore_newest(
        ocp, manager, checkpoint_dir, (fresh.params, fresh.ema), fresh.opt_state
    )
    if latest is None:
        return fresh, []
    _check_same_run(restored.config, config, checkpoint_dir)
    params, ema = jax.tree.map(jnp.asarray, restored.weights)
    opt_state = jax.tree.map(jnp.asarray, restored.optimiser)
    return TrainState(params, ema, opt_state, jnp.asarray(latest)), failures


def _check_not_past(start: int, steps: int, checkpoint_dir) -> None:
    """Refuse to resume from a checkpoint past `steps`: returning its model would
    hide that this call trained nothing and that `steps` was not what ran.

    **Raises:** `ValueError` naming the checkpoint's step and the ways on.
    """
    if start > steps:
        raise ValueError(
            f"checkpoint_dir {checkpoint_dir} holds step {start}, past steps={steps}: pass "
            f"steps >= {start} to continue, load it with jf.load_checkpoint, or use a new "
            "checkpoint_dir."
        )


def _set_aside(manager, checkpoint_dir, failures, start: int) -> None:
    """Rename the step folders that did not restore (all newer than `start`, the
    step resumed from) to `<step>.unrestorable`, and warn naming them. Moved, not
    deleted: a failed read may be passing (a network file system), and the files
    are the user's. Needed: orbax skips, silently, the save of a step at or before
    its latest, so a damaged newer step would stop this run from checkpointing."""
    moved = []
    for step, _ in failures:
        path = os.path.join(manager.directory, str(step))
        target, n = f"{path}.unrestorable", 1
        while os.path.exists(target):
            target, n = f"{path}.unrestorable{n}", n + 1
        os.rename(path, target)
        moved.append(target)
    manager.reload()
    warnings.warn(
        _fallback_message(checkpoint_dir, failures, start)
        + f" Moved aside, so that this run writes those steps anew: {', '.join(moved)}.",
        stacklevel=3,
    )


def _compile_step(loss_fn, static, optimiser, key, batch_size, ema_decay) -> Callable:
    """The training step `(data, state) -> (state, loss)`, jit-compiled.

    Step `i = state.step` draws its batch and its loss randomness from
    `fold_in(key, i)` alone, so that the result does not depend on how a run is cut
    into chunks or calls: this is what makes resumption exact.
    """

    # the data is an argument, not a closure: a constant would be baked into the
    # compiled program.
    # One compiled step called from Python, not a lax.scan over steps: XLA:CPU runs
    # convolution gradients inside a while loop about 8x slower (a UNet step on 8x8
    # digits: 0.8 s in a scan, 0.1 s called per step, channel-last or not), while the
    # dispatch costs a small MLP about 0.5 ms a step; dispatch is asynchronous, so
    # the loop only waits at the end of a chunk
    @eqx.filter_jit
    def step(data, state):
        kb, kl = jax.random.split(jax.random.fold_in(key, state.step))
        batch = data[jax.random.randint(kb, (batch_size,), 0, data.shape[0])]
        loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), batch, kl))(
            state.params
        )
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema, params)
        return TrainState(params, ema, opt_state, state.step + 1), loss

    return step


def _run_chunk(step, data, state, length) -> tuple[TrainState, np.ndarray]:
    """`length` steps from `state`: the new state and the `(length,)` losses on the
    host. The steps are dispatched asynchronously; reading the losses back is where
    the host waits for them."""
    losses = []
    for _ in range(length):
        state, loss = step(data, state)
        losses.append(loss)
    return state, np.asarray(jnp.stack(losses))


def _check_finite(losses, start, manager, checkpoint_dir) -> None:
    """Stop the run if a loss of the chunk that began at step `start` is not finite.
    The chunk's state is dropped, never saved, so the last checkpoint stays good.

    **Raises:** `FloatingPointError` naming the first bad step and that checkpoint.
    """
    if np.all(np.isfinite(losses)):
        return
    bad = start + int(np.argmin(np.isfinite(losses)))
    kept = None if manager is None else manager.latest_step()
    raise FloatingPointError(
        f"jaxflow.train: the loss is not finite at step {bad}; the weights were not "
        f"updated past step {start}"
        + (
            f"; the last good checkpoint (step {kept}) is in {checkpoint_dir}."
            if kept is not None
            else "."
        )
        + " Lower the learning rate or check the data and the loss."
    )


def _bar_size(stream=None) -> dict:
    """tqdm's size arguments for a bar on `stream` (default stderr): follow the
    terminal's size as it changes when it reports one; else a fixed 80 x 24. A
    terminal of unknown or zero size (a pty whose size was never set) makes tqdm
    size the bar from `0 - 1` columns and rows, and it draws blank lines."""
    stream = sys.stderr if stream is None else stream
    try:
        columns, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # not a terminal, or no fileno
        columns = lines = 0
    if columns > 0 and lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": columns if columns > 0 else 80, "nrows": lines if lines > 0 else 24}


class _Progress:
    """Reports on stderr after each chunk: a tqdm bar (steps done, loss, ETA) when
    tqdm is installed and stderr is a terminal, else one plain line a chunk (redrawn
    in place in a terminal), so that logs and CI output stay readable. A context
    manager, so that the bar or the line is closed even when the run raises."""

    def __init__(self, enabled: bool, first: int, steps: int):
        self.enabled, self.first, self.steps = enabled, first, steps
        self.tty = enabled and sys.stderr.isatty()
        self.bar = self._tqdm() if self.tty else None
        self.line_open = False
        self.t0 = time.perf_counter()

    def _tqdm(self):
        try:  # tqdm is optional: imported here, only when a bar would be shown
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(
            total=self.steps, initial=self.first, unit="step", file=sys.stderr, **_bar_size()
        )

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        rate = (step - self.first) / (time.perf_counter() - self.t0)
        self.line_open = self.tty and step < self.steps
        print(
            f"{chr(13) if self.tty else ''}step {step}/{self.steps}  loss {loss:.4g}  "
            f"{rate:.0f} steps/s",
            end="" if self.line_open else "\n",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.close()
        elif self.line_open:  # a run stopped mid-way: end the redrawn line
            print(file=sys.stderr, flush=True)


def train(
    model: eqx.Module,
    loss_fn: Callable[[eqx.Module, Array, PRNGKeyArray], Array],
    # any shape here: train checks for (N, n) itself, to raise a ValueError naming it
    data: Float[ArrayLike, "..."],
    *,
    steps: int,
    key: PRNGKeyArray,
    optimiser: optax.GradientTransformation | None = None,
    batch_size: int = 256,
    ema_decay: float = 0.999,
    chunk: int = 100,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1000,
    config: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` to minimise `loss_fn(model, batch, key)` on minibatches of `data`.

    **Arguments:**

    - `model`: an `eqx.Module` (`jf.nn.MLP`, `jf.nn.UNet`, ...).
    - `loss_fn`: e.g. `lambda m, x, k: jf.flow_matching_loss(m, path, x, k)`.
    - `data`: `(N, n)` training points; batches are drawn with replacement.
    - `steps`: total steps; a resumed run continues up to this number. A checkpoint
      at exactly `steps` (a finished run, rerun) is returned as it is, with no
      losses; one past it raises.
    - `key`: step `i` uses `fold_in(key, i)` for its batch and its loss.
    - `optimiser`: an optax transformation (default Adam, learning rate 1e-3).
    - `batch_size`, `ema_decay`: minibatch size and EMA decay. The batch size is
      recorded in each checkpoint, and a resumed run must use the same one.
    - `chunk`: steps between host synchronisations: the progress report and the
      NaN check run after each chunk.
    - `checkpoint_dir`: if given, an orbax checkpoint is written every
      `checkpoint_every` steps and at the end (the last two are kept), and a run
      resumes from the newest one there that restores: a damaged, empty or non-finite
      newer one is skipped with a warning naming it and its error, and renamed to
      `<step>.unrestorable` so that the run can write that step anew.
    - `config`: a JSON-able dict saved with each checkpoint (the run's settings),
      checked before the first step; `step` and `prng_key` are reserved (`train`
      writes them), and so is `batch_size`, which `train` writes too (a config that
      gives it must give this run's).
    - `progress`: report the steps done and the loss after each chunk, on stderr: a
      tqdm bar with an ETA when tqdm is installed and stderr is a terminal, else a
      plain line a chunk (readable in logs and CI).

    **Returns:** a `TrainResult`; its `state` is the final `TrainState`, equal leaf
    for leaf to that of a run interrupted and resumed from a checkpoint.

    **Raises:** `ValueError`, before any step, for bad data or settings (`steps`,
    `batch_size`, `chunk` and `checkpoint_every` must be positive ints; `config` a
    JSON-able dict without the reserved keys; `checkpoint_dir` a writable
    directory), or when `checkpoint_dir` holds a run started with another key or
    another `batch_size` (a checkpoint written before `train` recorded the batch
    size resumes unchecked for it), a model of other shapes, another optimiser's
    state, a step past `steps`, or no checkpoint that restores (each step and its
    error named); `FloatingPointError` when the loss is not finite, leaving the last
    good checkpoint in place.
    """
    data, steps, batch_size, chunk, checkpoint_every = _check_arguments(
        model, loss_fn, data, key, steps, batch_size, chunk, checkpoint_every, ema_decay
    )
    optimiser = optax.adam(1e-3) if optimiser is None else optimiser
    params, static = eqx.partition(model, eqx.is_array)
    # what a resumed run must share with the run that wrote the checkpoint
    config = dict(_check_config(config, batch_size), prng_key=_key_json(key), batch_size=batch_size)
    ocp, manager = None, None
    if checkpoint_dir is not None:
        _check_checkpoint_dir(checkpoint_dir)
        ocp, manager = _checkpoint_manager(checkpoint_dir)
    state, failures = _restore_or_init(params, optimiser, ocp, manager, checkpoint_dir, config)
    _check_not_past(int(state.step), steps, checkpoint_dir)
    if failures:
        _set_aside(manager, checkpoint_dir, failures, int(state.step))
    step_fn = _compile_step(loss_fn, static, optimiser, key, batch_size, ema_decay)

    losses = []
    step = int(state.step)
    with _Progress(progress, step, steps) as report:
        while step < steps:
            # a chunk ends where a checkpoint is due, so that one is written at
            # every multiple of checkpoint_every
            length = min(chunk, steps - step, checkpoint_every - step % checkpoint_every)
            new_state, chunk_losses = _run_chunk(step_fn, data, state, length)
            _check_finite(chunk_losses, step, manager, checkpoint_dir)
            state, step = new_state, step + length
            losses.append(chunk_losses)
            if manager is not None and (step % checkpoint_every == 0 or step == steps):
                _save(ocp, manager, state, config)
            report.update(step, float(chunk_losses.mean()))
    return TrainResult(
        model=eqx.combine(state.params, static),
        ema=eqx.combine(state.ema, static),
        opt_state=state.opt_state,
        step=step,
        losses=jnp.asarray(np.concatenate(losses) if losses else np.zeros(0)),
    )


def load_checkpoint(directory: str, model: eqx.Module) -> tuple[eqx.Module, eqx.Module, int, dict]:
    """Read the newest checkpoint that `train` wrote in `directory` and that
    restores: a damaged, empty or non-finite newer one is skipped with a warning
    naming it and its error (and left in place: this function writes nothing).

    **Arguments:**

    - `directory`: the `checkpoint_dir` given to `train`.
    - `model`: a template of the same structure (e.g. the freshly initialised
      network). The optimiser state is not read, so no optimiser is needed.

    **Returns:** `(model, ema, step, config)`: the weights and their EMA as models,
    the step the checkpoint was written at, and the run's config (with `step`,
    `prng_key` and, from a checkpoint written since `train` records it,
    `batch_size`).

    **Raises:** `ValueError` when `directory` is not a directory (it is not created),
    holds no checkpoint or none that restores (each step and its error named), or
    holds a model of other shapes than `model` (the first differing leaf named).
    """
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory: pass the checkpoint_dir given to train.")
    ocp, manager = _checkpoint_manager(directory)
    params, static = eqx.partition(model, eqx.is_array)
    latest, restored, failures = _restore_newest(ocp, manager, directory, (params, params))
    if latest is None:
        raise ValueError(f"no checkpoint in {directory}.")
    if failures:
        warnings.warn(_fallback_message(directory, failures, latest), stacklevel=2)
    params, ema = restored.weights
    return (
        eqx.combine(params, static),
        eqx.combine(ema, static),
        latest,
        json.loads(json.dumps(restored.config)),
    )
