"""Time grids as diffusers' flow-matching schedulers make them, and the Heun
step of `FlowMatchHeunDiscreteScheduler` as a diffrax solver.

A diffusers flow-matching pipeline integrates the PF-ODE of rectified flow,
`x_sigma = (1 - sigma) x_0 + sigma z`, whose time is jaxflow's `t = sigma`: the
grid below, walked backwards by `jf.generate(..., solver="euler", times=grid)`,
is the pipeline's own Euler loop `x + (sigma_next - sigma) v`.
"""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ._torch import require

_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def calculate_shift(seq_len: int, config) -> float:
    """FLUX's resolution-dependent shift `mu`, linear in the number of image
    tokens between `(base_image_seq_len, base_shift)` and `(max_image_seq_len,
    max_shift)` (diffusers' `calculate_shift`)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * slope + (base_shift - slope * base_len)


def _shift_exponential(mu: float, sigmas):
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def _shift_linear(mu: float, sigmas):
    return mu / (mu + (1 / sigmas - 1) ** 1.0)


def _numpy_sigmas(config, steps: int, sigmas, mu) -> np.ndarray:
    """`FlowMatchEulerDiscreteScheduler.set_timesteps(steps, sigmas=, mu=)` in
    NumPy, operation for operation (float32 where diffusers uses torch), for a
    machine without torch: the plain and the dynamic (exponential or linear)
    shift; the Karras, exponential, beta and terminal variants need diffusers."""
    for key in (*_UNSUPPORTED, "shift_terminal", "stochastic_sampling"):
        if config.get(key):
            raise ImportError(
                f"this scheduler sets {key}; its grid is computed by diffusers, which is "
                "not installed: pip install 'jaxflow[diffusers]'."
            )
    n_train = config.get("num_train_timesteps", 1000)
    shift = config.get("shift", 1.0)
    dynamic = config.get("use_dynamic_shifting", False)
    kind = config.get("time_shift_type", "exponential")
    train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
    if not dynamic:
        train = (shift * train / (1 + (shift - 1) * train)).astype(np.float32)
    if sigmas is None:
        grid = np.linspace(float(train[0]) * n_train, float(train[-1]) * n_train, steps)
        grid = grid / n_train
    else:
        grid = np.asarray(sigmas).astype(np.float32)
    if dynamic:
        grid = (_shift_exponential if kind == "exponential" else _shift_linear)(mu, grid)
    else:
        grid = shift * grid / (1 + (shift - 1) * grid)
    return np.append(np.asarray(grid, np.float32), np.float32(0.0))


def _diffusers_sigmas(diffusers, class_name: str, config, steps: int, sigmas, mu) -> np.ndarray:
    scheduler = getattr(diffusers, class_name).from_config(dict(config))
    kwargs = {} if mu is None else {"mu": mu}
    scheduler.set_timesteps(steps, device="cpu", sigmas=sigmas, **kwargs)
    return scheduler.sigmas.detach().cpu().numpy().astype(np.float32)


def pipeline_sigmas(architecture: str, class_name: str, config, steps: int, seq_len: int):
    """The sigmas (decreasing, ending with 0) that the SD3 or FLUX pipeline sets
    for `steps` steps and `seq_len` image tokens: diffusers' scheduler where
    diffusers is installed, else its NumPy transcription."""
    sigmas, mu = None, None
    if architecture == "flux":
        # FluxPipeline.__call__: an explicit linspace, shifted by the image's mu
        if not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(seq_len, config)
    elif config.get("use_dynamic_shifting", False):
        # StableDiffusion3Pipeline.__call__ computes mu only for a dynamic scheduler
        mu = calculate_shift(seq_len, {"max_shift": 1.16, **config})
    try:
        diffusers = require("diffusers")
    except ImportError:
        return _numpy_sigmas(config, steps, sigmas, mu)
    return _diffusers_sigmas(diffusers, class_name, config, steps, sigmas, mu)


class FlowMatchHeun(diffrax.AbstractSolver):
    """Heun's method as diffusers' `FlowMatchHeunDiscreteScheduler` runs it: the
    trapezoidal predictor-corrector on every step, except a step with an end at
    `t = 0`, which is a plain Euler step (diffusers ends at `sigma = 0` with one
    model call instead of two, `2N - 1` calls for `N` steps).

    Use it with a diffusers grid: `jf.generate(field, z, solver=jfd.FlowMatchHeun(),
    times=model.times(N))`. `jf.invert` with it takes the first step (from `t = 0`)
    by Euler as well, so a reconstruction uses one rule both ways. diffrax's own
    `Heun` on the same grid differs from diffusers in that last step (3.4e-3 on
    the tiny test model), this solver by float32 rounding.
    """

    term_structure = diffrax.AbstractTerm
    interpolation_cls = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        control = terms.contr(t0, t1)
        k0 = terms.vf_prod(t0, y0, args, control)
        euler = jax.tree.map(lambda y, k: y + k, y0, k0)

        def heun():
            k1 = terms.vf_prod(t1, euler, args, control)
            return jax.tree.map(lambda y, a, b: y + 0.5 * (a + b), y0, k0, k1)

        at_zero = (t0 == 0) | (t1 == 0)
        y1 = jax.lax.cond(at_zero, lambda: euler, heun)
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def as_times(sigmas: np.ndarray) -> jnp.ndarray:
    """A pipeline's decreasing sigmas as jaxflow's increasing time grid, float32
    exactly as the scheduler holds them."""
    return jnp.asarray(np.ascontiguousarray(sigmas[::-1]), dtype=jnp.float32)
