"""The digits score model shared by `digits_lyapunov.py` and
`digits_reconstruction.py`: a `UNet` trained by denoising score matching (noise
parameterisation, paper 003 G.3; Ho et al. 2020) on scikit-learn's 1797 8x8 digits
under the Ornstein-Uhlenbeck path, cached under `--cache` so that the second
script reuses the first one's weights; and its DDPM generation process, a map per
step with the noise frozen (paper 003 appendix A: a random dynamical system).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import final_loss

import jaxflow as jf

T_NOISE = 5.0  # sigma^2(T) = 1 - e^-10: the standard normal is the noise law
T_MIN = 1e-3  # the last DDPM step goes from here to t = 0 (the denoiser's value)


def add_model_arguments(p):
    p.add_argument("--train-steps", type=int, default=None, help="training steps (3000)")
    p.add_argument("--channels", type=int, default=None, help="UNet channels (16)")
    p.add_argument("--cache", default=None, help="trained weights (default <out>/cache)")


def model_settings(args):
    """Fills in the defaults (smaller under `--quick`) and returns the settings."""
    args.train_steps = args.train_steps or (60 if args.quick else 3000)
    args.channels = args.channels or (8 if args.quick else 16)
    # one level under --quick: every program over the UNet (training step, solves,
    # JVPs, VJPs) compiles in about half the time, and the code paths are the same
    args.multipliers = (1,) if args.quick else (1, 2)
    args.cache = args.cache or os.path.join(args.out, "cache")
    return dict(
        data="scikit-learn digits, 1797 images 8x8 in [-1, 1]",
        path=f"OrnsteinUhlenbeck(T={T_NOISE})",
        network=dict(kind="UNet", channels=args.channels, multipliers=args.multipliers, blocks=1),
        objective="denoising score matching, noise parameterisation (paper 002 eq. 4.34)",
        training=dict(
            steps=args.train_steps,
            batch=128,
            optimiser="adam, warm-up 100 steps then cosine decay from 2e-3",
            ema=0.999,
        ),
    )


def train_unet(
    data,
    cache: str,
    *,
    seed: int,
    name: str = "digits",
    size: int = 8,
    multipliers: tuple[int, ...] = (1, 2),
    channels: int = 16,
    steps: int = 3000,
    batch: int = 128,
    warmup: int = 100,
    chunk: int = 100,
    seed_offset: int = 1,
    checkpoint_every: int = 1000,
    progress: bool = True,
):
    """`(field, info)`: a `UNet` trained (or loaded from `cache`) by denoising score
    matching on the OU path, Adam with warm-up and cosine decay from 2e-3, EMA; the
    defaults are the 8x8 model's.

    **Arguments:**

    - `data`: `(N, size * size)` images in [-1, 1].
    - `cache`: the folder that holds the checkpoint folder
      `<name>_unet<channels>_<steps>_seed<seed>`.
    - `seed`: the network's initial weights use `PRNGKey(seed + seed_offset)`, the
      training `PRNGKey(seed + seed_offset + 1)`.
    - `name`: the model's name in the checkpoint folder and its config.
    - `size`, `multipliers`, `channels`: the `UNet` (`(1, size, size)` images, one
      block a level).
    - `steps`, `batch`, `warmup`, `chunk`, `checkpoint_every`: the training (`chunk`
      and `checkpoint_every` as for `jf.train`).
    - `progress`: report the training as it runs.

    **Returns:** the `LearnedField` of the EMA weights (noise parameterisation) and
    `info`, the training's wall time in seconds and its final loss (None when the
    weights came from the cache).
    """
    path = jf.OrnsteinUhlenbeck(T=T_NOISE)
    net = jf.nn.UNet(
        (1, size, size), channels, multipliers, 1, key=jax.random.PRNGKey(seed + seed_offset)
    )

    def loss(m, x, k):
        return jf.denoising_score_matching_loss(m, path, x, k)

    # optax refuses a cosine decay of no steps: the quick runs are shorter than the warm-up
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(steps, warmup + 1))
    start = time.perf_counter()
    result = jf.train(
        net,
        loss,
        data,
        steps=steps,
        key=jax.random.PRNGKey(seed + seed_offset + 1),
        optimiser=optax.adam(schedule),
        batch_size=batch,
        chunk=chunk,
        checkpoint_dir=os.path.join(cache, f"{name}_unet{channels}_{steps}_seed{seed}"),
        checkpoint_every=checkpoint_every,
        config=dict(model=name, channels=channels),
        progress=progress,
    )
    info = dict(train_seconds=time.perf_counter() - start, final_loss=final_loss(result))
    return jf.LearnedField(result.ema, path, "noise"), info


def digits_field(args):
    """`(field, data, info)`: the trained (or cached) model as a `LearnedField`."""
    data, _ = jf.data.digits(8)
    field, info = train_unet(
        data,
        args.cache,
        seed=args.seed,
        multipliers=args.multipliers,
        channels=args.channels,
        steps=args.train_steps,
        progress=not args.quiet,
    )
    info["note"] = (
        "final_loss: mean per-image loss (sum over 64 pixels) over the last 100 steps"
        " run in this call; none when the weights came from the cache"
    )
    return field, data, info


def ddpm_times(steps: int) -> np.ndarray:
    """`steps + 1` times from `T_NOISE` down to 0: geometric down to `T_MIN`, where
    the state is nearly denoised, then a last step to 0."""
    return np.concatenate([np.geomspace(T_NOISE * (1 - 1e-3), T_MIN, steps), [0.0]])


def ddpm_map(field, times, noises):
    """`step(x, i)`: DDPM step `i` from `times[i]` to `times[i+1]` with the noise
    `noises[i]` frozen; the last step returns the denoiser's value."""
    times = jnp.asarray(times)

    def step(x, i):
        t, t_next = times[i], times[i + 1]
        return jf.ddpm_step(field.path, x, t, t_next, field.denoise(x, t), noises[i])

    return step
