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
import time
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


def _restore_or_init(params, optimiser, ocp, manager, checkpoint_dir, key_json) -> TrainState:
    """The state to start from: the latest checkpoint in `manager` if there is one,
    else step 0 (weights `params`, the EMA equal to them, a fresh optimiser state).

    **Raises:** `ValueError` when the checkpoint was written with another key: its
    steps drew other batches, so carrying on with this key would not continue it.
    """
    fresh = TrainState(params, params, optimiser.init(params), jnp.asarray(0))
    latest = None if manager is None else manager.latest_step()
    if latest is None:
        return fresh
    # the fresh state is the template: orbax restores to its structure and dtypes
    restored = _restore(ocp, manager, latest, (fresh.params, fresh.ema), fresh.opt_state)
    saved_key = restored.config.get("prng_key")
    if saved_key is not None and saved_key != key_json:
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} was written by a run with key data "
            f"{saved_key}, not {key_json}: resuming with another key would "
            "not continue that run. Pass its key, or start in a new checkpoint_dir."
        )
    params, ema = jax.tree.map(jnp.asarray, restored.weights)
    opt_state = jax.tree.map(jnp.asarray, restored.optimiser)
    return TrainState(params, ema, opt_state, jnp.asarray(latest))


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
            total=self.steps, initial=self.first, unit="step", file=sys.stderr, dynamic_ncols=True
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
    - `steps`: total steps; a resumed run continues up to this number.
    - `key`: step `i` uses `fold_in(key, i)` for its batch and its loss.
    - `optimiser`: an optax transformation (default Adam, learning rate 1e-3).
    - `batch_size`, `ema_decay`: minibatch size and EMA decay.
    - `chunk`: steps between host synchronisations: the progress report and the
      NaN check run after each chunk.
    - `checkpoint_dir`: if given, an orbax checkpoint is written every
      `checkpoint_every` steps and at the end, and a run finds the latest one there
      and resumes from it.
    - `config`: a JSON-able dict saved with each checkpoint (the run's settings).
    - `progress`: report the steps done and the loss after each chunk, on stderr: a
      tqdm bar with an ETA when tqdm is installed and stderr is a terminal, else a
      plain line a chunk (readable in logs and CI).

    **Returns:** a `TrainResult`; its `state` is the final `TrainState`, equal leaf
    for leaf to that of a run interrupted and resumed from a checkpoint.

    **Raises:** `ValueError` for bad data or settings (`steps`, `batch_size`, `chunk`
    and `checkpoint_every` must be positive ints), or when `checkpoint_dir` holds a
    run started with another key; `FloatingPointError` when the loss is not finite,
    leaving the last good checkpoint in place.
    """
    data, steps, batch_size, chunk, checkpoint_every = _check_arguments(
        model, loss_fn, data, key, steps, batch_size, chunk, checkpoint_every, ema_decay
    )
    optimiser = optax.adam(1e-3) if optimiser is None else optimiser
    params, static = eqx.partition(model, eqx.is_array)
    key_json = _key_json(key)
    config = dict(config or {}, prng_key=key_json)
    ocp, manager = (None, None) if checkpoint_dir is None else _checkpoint_manager(checkpoint_dir)
    state = _restore_or_init(params, optimiser, ocp, manager, checkpoint_dir, key_json)
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
    """Read the latest checkpoint that `train` wrote in `directory`.

    **Arguments:**

    - `directory`: the `checkpoint_dir` given to `train`.
    - `model`: a template of the same structure (e.g. the freshly initialised
      network). The optimiser state is not read, so no optimiser is needed.

    **Returns:** `(model, ema, step, config)`: the weights and their EMA as models,
    the step the checkpoint was written at, and the run's config (with `step` and
    `prng_key`).

    **Raises:** `ValueError` when `directory` holds no checkpoint.
    """
    ocp, manager = _checkpoint_manager(directory)
    latest = manager.latest_step()
    if latest is None:
        raise ValueError(f"no checkpoint in {directory}.")
    params, static = eqx.partition(model, eqx.is_array)
    restored = _restore(ocp, manager, latest, (params, params))
    params, ema = restored.weights
    return (
        eqx.combine(params, static),
        eqx.combine(ema, static),
        latest,
        json.loads(json.dumps(restored.config)),
    )
