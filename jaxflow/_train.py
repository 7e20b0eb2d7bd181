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

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from ._misc import check_positive_int


class TrainResult(eqx.Module):
    """What `train` returns.

    - `model`: the trained network; `ema`: its exponential moving average (use it
      for sampling).
    - `opt_state`: the optimiser state; `step`: steps taken in total.
    - `losses`: `(steps this call,)` the loss of every step this call ran.
    """

    model: eqx.Module
    ema: eqx.Module
    opt_state: optax.OptState
    step: int
    losses: Float[Array, " steps"]


def _checkpoint_manager(directory):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp, ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save(ocp, manager, step, state, config):
    # weights and optimiser state are separate items, so that the weights can be
    # read back without knowing the optimiser
    params, ema, opt_state = state
    manager.save(
        step,
        args=ocp.args.Composite(
            weights=ocp.args.StandardSave((params, ema)),
            optimiser=ocp.args.StandardSave(opt_state),
            config=ocp.args.JsonSave(config),
        ),
    )
    manager.wait_until_finished()


def _restore(ocp, manager, step, weights, opt_state=None):
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
    items = dict(weights=ocp.args.StandardRestore(abstract(weights)), config=ocp.args.JsonRestore())
    if opt_state is not None:
        items["optimiser"] = ocp.args.StandardRestore(abstract(opt_state))
    return manager.restore(step, args=ocp.args.Composite(**items))


def train(
    model: eqx.Module,
    loss_fn: Callable[[eqx.Module, Array, PRNGKeyArray], Array],
    data: Float[Array, "N n"],
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
    - `chunk`: steps between host synchronisations: the progress line and the
      NaN check run after each chunk.
    - `checkpoint_dir`: if given, an orbax checkpoint is written every
      `checkpoint_every` steps and at the end, and a run finds the latest one there
      and resumes from it.
    - `config`: a JSON-able dict saved with each checkpoint (the run's settings).
    - `progress`: print a progress line with the loss after each chunk (stderr).

    **Returns:** a `TrainResult`.

    **Raises:** `ValueError` for bad data or settings; `FloatingPointError` when the
    loss is not finite, leaving the last good checkpoint in place.
    """
    data = jnp.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must be (N, n) points, got shape {data.shape}.")
    if not jnp.all(jnp.isfinite(data)):
        raise ValueError("data contains NaN or inf.")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    chunk = check_positive_int("chunk", chunk)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}.")
    optimiser = optax.adam(1e-3) if optimiser is None else optimiser
    params, static = eqx.partition(model, eqx.is_array)
    try:
        # shapes only: an eager evaluation of a UNet loss would take seconds
        probe = eqx.filter_eval_shape(loss_fn, model, data[: min(2, len(data))], key)
    except Exception as e:
        raise ValueError(f"loss_fn failed on a batch of data of shape {data[:2].shape}: {e}") from e
    if probe.shape != ():
        raise ValueError(f"loss_fn must return a scalar, got shape {probe.shape}.")
    state = (params, params, optimiser.init(params))
    step = 0
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    config = dict(config or {}, prng_key=np.asarray(key_data).tolist())
    ocp = manager = None
    if checkpoint_dir is not None:
        ocp, manager = _checkpoint_manager(checkpoint_dir)
        latest = manager.latest_step()
        if latest is not None:
            restored = _restore(ocp, manager, latest, state[:2], state[2])
            saved_key = restored.config.get("prng_key")
            if saved_key is not None and saved_key != config["prng_key"]:
                raise ValueError(
                    f"the checkpoint in {checkpoint_dir} was written by a run with key data "
                    f"{saved_key}, not {config['prng_key']}: resuming with another key would "
                    "not continue that run. Pass its key, or start in a new checkpoint_dir."
                )
            params_ema = jax.tree.map(jnp.asarray, restored.weights)
            state = (*params_ema, jax.tree.map(jnp.asarray, restored.optimiser))
            step = latest

    # the data is an argument, not a closure: a constant would be baked into the
    # compiled program.
    # One compiled step called from Python, not a lax.scan over steps: XLA:CPU runs
    # convolution gradients inside a while loop about 8x slower (a UNet step on 8x8
    # digits: 0.8 s in a scan, 0.1 s called per step, channel-last or not), while the
    # dispatch costs a small MLP about 0.5 ms a step; dispatch is asynchronous, so
    # the loop only waits at the end of a chunk
    @eqx.filter_jit
    def one_step(data, state, i):
        params, ema, opt_state = state
        k = jax.random.fold_in(key, i)
        kb, kl = jax.random.split(k)
        batch = data[jax.random.randint(kb, (batch_size,), 0, data.shape[0])]
        loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), batch, kl))(
            params
        )
        updates, opt_state = optimiser.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return (params, ema, opt_state), loss

    def run(state, start, length, data):
        chunk_losses = []
        for i in range(start, start + length):
            state, loss = one_step(data, state, jnp.asarray(i))
            chunk_losses.append(loss)
        return state, jnp.stack(chunk_losses)

    losses = []
    t0 = time.perf_counter()
    first = step
    while step < steps:
        length = min(chunk, steps - step, checkpoint_every - step % checkpoint_every)
        new_state, chunk_losses = run(state, step, length, data)
        chunk_losses = np.asarray(chunk_losses)
        if not np.all(np.isfinite(chunk_losses)):
            bad = step + int(np.argmin(np.isfinite(chunk_losses)))
            kept = None if manager is None else manager.latest_step()
            raise FloatingPointError(
                f"jaxflow.train: the loss is not finite at step {bad}; the weights were not "
                f"updated past step {step}"
                + (
                    f"; the last good checkpoint (step {kept}) is in {checkpoint_dir}."
                    if kept is not None
                    else "."
                )
                + " Lower the learning rate or check the data and the loss."
            )
        state = new_state
        step += length
        losses.append(chunk_losses)
        if manager is not None and (step % checkpoint_every == 0 or step == steps):
            _save(ocp, manager, step, state, dict(config, step=step))
        if progress:
            rate = (step - first) / (time.perf_counter() - t0)
            # one line redrawn in a terminal, one line a chunk in a log file
            tty = sys.stderr.isatty()
            print(
                f"{chr(13) if tty else ''}step {step}/{steps}  loss {chunk_losses.mean():.4g}  "
                f"{rate:.0f} steps/s",
                end="" if tty and step < steps else "\n",
                file=sys.stderr,
                flush=True,
            )
    params, ema, opt_state = state
    return TrainResult(
        model=eqx.combine(params, static),
        ema=eqx.combine(ema, static),
        opt_state=opt_state,
        step=step,
        losses=jnp.asarray(np.concatenate(losses) if losses else np.zeros(0)),
    )


def load_checkpoint(directory: str, model: eqx.Module) -> tuple:
    """`(model, ema, step, config)` from the latest checkpoint that `train` wrote in
    `directory`; `model` is a template of the same structure (e.g. the freshly
    initialised network). The optimiser state is not read."""
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
