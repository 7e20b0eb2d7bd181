"""PyTorch routes for `benchmarks/instability_grid.py` (paper 000 Fig. 3 workload).

What a researcher writes without jaxflow, over the whole `(N, 2)` batch:

- the rectified-flow velocity of the isotropic mixture and its 2x2 spatial
  Jacobian `Dv`, both in closed form (`Dv` written out by hand: differentiating
  the softmax weights; checked against `torch.func.jacrev` in `check_jacobian`);
- torchdiffeq's `odeint(method="dopri5")` of the probability-flow ODE from t = 1 to
  t = 0, for `G` alone (state `x`, `(B, 2)`) and for `G` with its Jacobian (the
  variational equation, state `[x, vec J]`, `(B, 2 + 4)`, `dJ/dt = Dv(x) J`), with
  the right-hand side `torch.compile`d or eager, and one of two error norms:
  torchdiffeq's default RMS over the whole batch tensor ("batch-joint": one step
  size for the whole batch, an average error) or the max over points of each
  point's RMS ("per-point": every point meets the tolerance, the whole batch
  steps at the pace of the hardest point);
- a whole-batch Dopri5 written directly in torch, the whole step (6 evaluations,
  error estimate, step-size update) `torch.compile`d, with a step size per point
  and a per-point error norm: lanes that finish stop moving, the loop runs until
  every lane is done.

Everything runs in the dtype of the batch (float64 for the benchmark) under
`torch.inference_mode()`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch._inductor.config
import torchdiffeq

# Dormand-Prince 5(4): nodes, stages, 5th-order weights and (5th - 4th) weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True))


def setup(device: str = "cpu") -> dict:
    """All cores for torch's intra-op threads, every tensor on `device` ('cpu' or
    'cuda'); the versions for the JSON."""
    torch.set_num_threads(os.cpu_count())
    torch.set_default_device(device)
    # cold compiles, as a first run sees them (and as jax's, which has no cache here)
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    return dict(
        torch_version=torch.__version__,
        torchdiffeq_version=getattr(torchdiffeq, "__version__", "?"),
        threads=torch.get_num_threads(),
        device=str(torch.get_default_device()),
    )


class Mixture:
    """Velocity of rectified flow towards an isotropic Gaussian mixture
    (weights `w_k`, means `mu_k`, variances `var_k`), in torch.

    With `a = 1 - t`, `s = t`, `c_k = a^2 var_k + s^2`, `r_k` the posterior weights
    (softmax of `log w_k - (n log c_k + |x - a mu_k|^2 / c_k) / 2`),
    `v(x, t) = -sum_k r_k (mu_k + beta_k (x - a mu_k))`, `beta_k = (a var_k - s) / c_k`
    (the same field as `numpy_velocity` in `instability_grid.py`)."""

    def __init__(self, weights, means, variances, dtype):
        self.dtype = dtype
        self.logw = torch.log(torch.as_tensor(np.array(weights), dtype=dtype))
        self.mu = torch.as_tensor(np.array(means), dtype=dtype)
        self.var = torch.as_tensor(np.array(variances), dtype=dtype)
        self.n = self.mu.shape[1]
        self.eye = torch.eye(self.n, dtype=dtype)

    def _parts(self, t, x):
        # t: 0-d or (B,) tensor; x: (B, n)
        t = t.reshape(-1, 1)
        a, s = 1 - t, t
        c = a * a * self.var + s * s  # (B|1, K)
        resid = x[:, None, :] - a[..., None] * self.mu  # (B, K, n)
        logits = self.logw - 0.5 * (self.n * torch.log(c) + (resid * resid).sum(-1) / c)
        r = torch.softmax(logits, -1)  # (B, K)
        beta = (a * self.var - s) / c  # (B|1, K)
        rm = r[..., None] * (self.mu + beta[..., None] * resid)  # (B, K, n)
        return c, resid, r, beta, rm

    def velocity(self, t, x):
        return -self._parts(t, x)[-1].sum(1)

    def velocity_and_jacobian(self, t, x):
        """`v (B, n)` and `Dv (B, n, n)`: with `g_k = -(x - a mu_k) / c_k` the gradient
        of the k-th logit and `gbar = sum_k r_k g_k`,
        `Dv = -(sum_k r_k beta_k) I - sum_k r_k m_k g_k^T - v gbar^T`."""
        c, resid, r, beta, rm = self._parts(t, x)
        v = -rm.sum(1)
        g = -resid / c[..., None]
        gbar = (r[..., None] * g).sum(1)
        dv = (
            -(r * beta).sum(-1)[:, None, None] * self.eye
            - (rm[..., :, None] * g[..., None, :]).sum(1)
            - v[:, :, None] * gbar[:, None, :]
        )
        return v, dv

    def variational(self, t, y):
        """Right-hand side of the variational equation on the state `[x, vec J]`."""
        n = self.n
        x, jac = y[:, :n], y[:, n:].reshape(-1, n, n)
        v, dv = self.velocity_and_jacobian(t, x)
        # Dv J as a broadcast sum, not `dv @ jac`: a batched 2x2 matmul is a library
        # call per evaluation, which torch.compile cannot fuse with the rest
        dj = (dv[:, :, :, None] * jac[:, None, :, :]).sum(2)
        return torch.cat([v, dj.reshape(-1, n * n)], 1)


def check_jacobian(mix: Mixture, points: int = 64, seed: int = 0) -> float:
    """Max |Dv (closed form) - Dv (torch.func.jacrev)| over random points and times."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(points, mix.n, generator=gen, dtype=mix.dtype) * 2 - 1
    t = torch.rand(points, generator=gen, dtype=mix.dtype) * 0.98 + 0.01
    _, dv = mix.velocity_and_jacobian(t, x)
    one = lambda xi, ti: mix.velocity(ti, xi[None])[0]  # noqa: E731
    auto = torch.func.vmap(torch.func.jacrev(one))(x, t)
    return float((dv - auto).abs().max())


def rms_norm(e):
    """torchdiffeq's default: RMS over the whole batch tensor."""
    return e.pow(2).mean().sqrt()


def per_point_norm(e):
    """Max over points of each point's RMS: every point meets the tolerance."""
    return e.pow(2).mean(1).sqrt().max()


def _maybe_compile(fn, compile: bool):
    return torch.compile(fn, dynamic=False, fullgraph=True) if compile else fn


class _Counted:
    """Counts calls (one per batch-wide evaluation of the right-hand side); the
    route resets it at the start of each solve."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, t, y):
        self.calls += 1
        return self.fn(t, y)


def _state0(z, with_jacobian):
    if not with_jacobian:
        return z
    eye = torch.eye(z.shape[1], dtype=z.dtype).reshape(1, -1).expand(z.shape[0], -1)
    return torch.cat([z, eye], 1)


def _split(y, n, with_jacobian):
    if not with_jacobian:
        return y, None
    return y[:, :n], y[:, n:].reshape(-1, n, n)


def torchdiffeq_route(mix, rtol, atol, *, with_jacobian, norm, compile):
    """`fn(z) -> (x, J) or (x, None)` and its evaluation counter."""
    rhs = _maybe_compile(mix.variational if with_jacobian else mix.velocity, compile)
    counted = _Counted(rhs)
    opts = None if norm is rms_norm else dict(norm=norm)
    ts = torch.tensor([1.0, 0.0], dtype=mix.dtype)

    def fn(z):
        counted.calls = 0
        with torch.inference_mode():
            y = torchdiffeq.odeint(
                counted,
                _state0(z, with_jacobian),
                ts,
                method="dopri5",
                rtol=rtol,
                atol=atol,
                options=opts,
            )[-1]
        return _split(y, mix.n, with_jacobian)

    return fn, counted


def batch_dopri5_route(mix, rtol, atol, *, with_jacobian, compile, max_steps=100_000):
    """Whole-batch Dopri5 with a step size per point (see the module docstring).

    Integrates in `tau = 1 - t` from 0 to 1 (`dy/dtau = -v(1 - tau, y)`). Each
    point: Hairer's initial step (2 evaluations), then steps of 6 evaluations
    (first-same-as-last), accepted when the point's RMS of
    `err / (atol + rtol max(|y0|, |y1|))` is at most 1, the next step
    `h * clip(0.9 err^(-1/5), 0.2, 10)`, clipped to the end. Returns `fn(z)` and a
    dict that receives the loop's iteration count and the mean steps a point."""
    field = mix.variational if with_jacobian else mix.velocity
    dtype = mix.dtype

    def f(tau, y):
        return -field(1 - tau, y)

    def scaled_rms(e, scale):
        return (e / scale).pow(2).mean(1).sqrt()

    def init(y0):
        tau = torch.zeros(y0.shape[0], dtype=dtype)
        f0 = f(tau, y0)
        scale = atol + rtol * y0.abs()
        d0, d1 = scaled_rms(y0, scale), scaled_rms(f0, scale)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, 1e-6, 0.01 * d0 / torch.where(small, 1.0, d1))
        f1 = f(tau + h0, y0 + h0[:, None] * f0)
        d2 = scaled_rms(f1 - f0, scale) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(
            dmax <= 1e-15,
            torch.clamp(h0 * 1e-3, min=1e-6),
            (0.01 / torch.clamp(dmax, min=1e-300)) ** 0.2,
        )
        h = torch.clamp(torch.minimum(100 * h0, h1), max=1.0)
        done = torch.zeros_like(tau, dtype=torch.bool)
        return tau, y0, h, f0, done, torch.zeros_like(tau, dtype=torch.int64)

    def step(tau, y, h, k1, done, nsteps):
        hh = torch.where(done, 0.0, h)[:, None]
        ks = [k1]
        for i in range(1, 7):
            yi = y + hh * sum(a * k for a, k in zip(_A[i], ks, strict=True) if a != 0.0)
            ks.append(f(tau + _C[i] * hh[:, 0], yi))
        y1 = yi  # the 7th stage is evaluated at the 5th-order solution (FSAL)
        err = hh * sum(e * k for e, k in zip(_E, ks, strict=True) if e != 0.0)
        ratio = scaled_rms(err, atol + rtol * torch.maximum(y.abs(), y1.abs()))
        accept = (ratio <= 1) & ~done
        last = h >= 1 - tau
        tau1 = torch.where(accept, torch.where(last, 1.0, tau + h), tau)
        factor = torch.clamp(0.9 * torch.clamp(ratio, min=1e-10) ** -0.2, 0.2, 10.0)
        h1 = torch.minimum(h * factor, 1 - tau1)
        nsteps = nsteps + (~done).to(nsteps.dtype)
        done1 = done | (accept & last)
        y1 = torch.where(accept[:, None], y1, y)
        k1 = torch.where(accept[:, None], ks[6], k1)
        return tau1, y1, h1, k1, done1, nsteps

    init_c, step_c = _maybe_compile(init, compile), _maybe_compile(step, compile)
    stats = {}

    def fn(z):
        with torch.inference_mode():
            state = init_c(_state0(z, with_jacobian))
            it = 0
            while not bool(state[4].all()):
                if it >= max_steps:
                    raise RuntimeError(f"batch Dopri5: not done after {max_steps} steps")
                state = step_c(*state)
                it += 1
        stats.update(iterations=it, mean_steps=float(state[5].double().mean()))
        return _split(state[1], mix.n, with_jacobian)

    return fn, stats


def routes(mix: Mixture, rtol, atol, *, compile: bool = True):
    """Two registries like `instability_grid.jaxflow_routes`: `{name: (fn, info)}`
    for G + J and for G alone; `fn(z)` takes a torch `(N, n)` batch and returns
    `(x, J)` (`J` None for G alone); `info()` returns the route's counters."""
    tag = "compiled"  # names stay put under --no-compile (the JSON says torch_compile: false)

    def tdq(with_jacobian, norm, comp):
        fn, counted = torchdiffeq_route(
            mix, rtol, atol, with_jacobian=with_jacobian, norm=norm, compile=comp
        )

        def info():  # after a call of fn: the batch-wide evaluations it made
            return dict(batch_evaluations=counted.calls)

        return fn, info

    def handwritten(with_jacobian):
        fn, stats = batch_dopri5_route(
            mix, rtol, atol, with_jacobian=with_jacobian, compile=compile
        )
        return fn, lambda: dict(stats)

    gj = {
        f"torchdiffeq dopri5 variational, {tag} rhs, batch-joint RMS norm": tdq(
            True, rms_norm, compile
        ),
        f"torchdiffeq dopri5 variational, {tag} rhs, per-point norm": tdq(
            True, per_point_norm, compile
        ),
        "torchdiffeq dopri5 variational, eager rhs, batch-joint RMS norm": tdq(
            True, rms_norm, False
        ),
        f"torch batch Dopri5 variational, {tag} step, per-point step size": handwritten(True),
    }
    g = {
        f"torchdiffeq dopri5 G alone, {tag} velocity, batch-joint RMS norm": tdq(
            False, rms_norm, compile
        ),
        f"torchdiffeq dopri5 G alone, {tag} velocity, per-point norm": tdq(
            False, per_point_norm, compile
        ),
        f"torch batch Dopri5 G alone, {tag} step, per-point step size": handwritten(False),
    }
    return gj, g


def timed(fn, z, repeats, cpu_seconds, long_s=10.0):
    """First call (compile included), then the best of up to `repeats` calls (one
    when a call takes over `long_s` seconds), the cores busy over them (process CPU
    time / wall time) and the number of timed calls."""

    def run():
        out = fn(z)
        if z.is_cuda:  # the GPU runs asynchronously: time the work, not the launch
            torch.cuda.synchronize()
        return out

    t0 = time.perf_counter()
    out = run()
    first_s = time.perf_counter() - t0
    best, wall, calls, cpu0 = np.inf, 0.0, 0, cpu_seconds()
    while calls < repeats and (calls == 0 or best <= long_s):
        t0 = time.perf_counter()
        out = run()
        dt = time.perf_counter() - t0
        best, wall, calls = min(best, dt), wall + dt, calls + 1
    return out, first_s, best, (cpu_seconds() - cpu0) / wall, calls
