"""PyTorch routes for `benchmarks/lyapunov.py`: what a researcher writes in torch,
float64, vectorised over the initial conditions / paths, all cores for torch's
intra-op threads, one Python-level loop over the steps.

- Lorenz-63: fixed-step Tsit5 (diffrax's tableau, passed in by the caller, so the
  discrete map is jaxflow's) on the state and the variational equation
  `dQ/dt = J(x) Q` together, `J` written out analytically; `torch.linalg.qr` of
  the frame every step, signs fixed so that `diag R > 0`. Tsit5 applied to
  `(x, Q)` gives exactly the tangent map of Tsit5 applied to `x` (a Runge-Kutta
  step commutes with linearisation), which is what jaxflow pushes by JVPs.
- Two moons (paper 003): the Euler-Maruyama step of the reverse SDE through the
  exact score of the `Empirical` law on the quadrature nodes (cosine path),
  its 2x2 Jacobian by `torch.func.jacfwd` with `has_aux` (the step's value comes
  out of the same pass), `torch.func.vmap` over the paths, `torch.linalg.qr` of
  `J Q` every step.

The step function (everything inside one step, QR included) is `torch.compile`d
(`fullgraph=True`, `dynamic=False`), or run eagerly. Path coefficients and time
step are tensors, not Python floats, so that one compiled graph serves every step.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch._inductor.config

DTYPE = torch.float64


def setup(threads: int | None = None) -> dict:
    """All cores (or `threads`) for torch's intra-op threads; the versions for the
    JSON."""
    torch.set_num_threads(threads or os.cpu_count())
    # cold compiles, as a first run sees them (jax has no persistent cache here either)
    torch._inductor.config.fx_graph_cache = False
    return dict(torch_version=torch.__version__, threads=torch.get_num_threads())


def _maybe_compile(fn, compile: bool):
    return torch.compile(fn, dynamic=False, fullgraph=True) if compile else fn


def _qr_update(q, total, weight, m):
    """Re-orthonormalise the pushed frame `m = dF Q`: `m = Q' R`, signs fixed so
    that `diag R > 0`; `weight * log |diag R|` added to `total`."""
    q, r = torch.linalg.qr(m)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(q.dtype)
    return q * sign[:, None, :], total + weight * torch.log(torch.abs(d))


# --- Lorenz-63


def lorenz_step_fn(sigma, rho, beta, a_lower, b_sol, compile: bool):
    """`step(x, q, total, dt, weight) -> (x, q, total)`: one fixed Tsit5 step of
    `(x, Q)`, batched over rows `(m, 3)` / `(m, 3, 3)`, then the QR."""
    a_lower = [tuple(float(c) for c in row) for row in a_lower]
    b_sol = tuple(float(c) for c in b_sol)

    def rhs(x, q):
        x0, x1, x2 = x[:, 0], x[:, 1], x[:, 2]
        f = torch.stack([sigma * (x1 - x0), x0 * (rho - x2) - x1, x0 * x1 - beta * x2], -1)
        zero, one = torch.zeros_like(x0), torch.ones_like(x0)
        jac = torch.stack(
            [
                torch.stack([-sigma * one, sigma * one, zero], -1),
                torch.stack([rho - x2, -one, -x0], -1),
                torch.stack([x1, x0, -beta * one], -1),
            ],
            -2,
        )
        return f, jac @ q

    def step(x, q, total, dt, weight):
        kx, kq = rhs(x, q)
        ks = [(kx, kq)]
        for row in a_lower:  # stages 2..7 (the 7th only feeds the error estimate: skipped)
            if len(ks) == len(b_sol) - 1:
                break
            xs = x + dt * sum(a * k[0] for a, k in zip(row, ks, strict=True) if a != 0.0)
            qs = q + dt * sum(a * k[1] for a, k in zip(row, ks, strict=True) if a != 0.0)
            ks.append(rhs(xs, qs))
        x = x + dt * sum(b * k[0] for b, k in zip(b_sol, ks, strict=False) if b != 0.0)
        q = q + dt * sum(b * k[1] for b, k in zip(b_sol, ks, strict=False) if b != 0.0)
        q, total = _qr_update(q, total, weight, q)
        return x, q, total

    return _maybe_compile(step, compile)


def lorenz_spectrum(step, x0, steps: int, transient: int, dt: float):
    """Exponents `(m, 3)`, descending, averaged over the steps after `transient`."""
    x = torch.tensor(np.array(x0), dtype=DTYPE)
    m = x.shape[0]
    q = torch.eye(3, dtype=DTYPE).expand(m, 3, 3).clone()
    total = torch.zeros(m, 3, dtype=DTYPE)
    dt_t = torch.tensor(dt, dtype=DTYPE)
    off, on = torch.tensor(0.0, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    for i in range(steps):
        x, q, total = step(x, q, total, dt_t, on if i >= transient else off)
    ex = total / ((steps - transient) * dt)
    return torch.sort(ex, dim=1, descending=True).values.numpy()


# --- two moons


def moons_step_fn(nodes, compile: bool, jacobian: str = "jacfwd"):
    """`step(x, q, total, xi, h, coef) -> (x, q, total)`: one Euler-Maruyama step
    of the reverse SDE for every path (rows of `x`, `(m, 2)`) with frozen noise
    `xi`, its Jacobian by `jacobian` (`torch.func.jacfwd` or `jacrev`) + `vmap`,
    then the QR. `coef` is `(alpha, sigma, f, g^2)` of the cosine path at the
    step's time.

    `torch.compile` of `vmap(jacfwd(...))` fails in torch 2.13 (an internal assert
    in `_fw_primal` during Dynamo's fake-tensor tracing: pytorch/pytorch#151196,
    #160508, both open); `jacrev` compiles."""
    nodes = torch.as_tensor(np.asarray(nodes), dtype=DTYPE)

    def em(x, xi, h, coef):  # one path, x of shape (2,)
        a, s, f, g2 = coef[0], coef[1], coef[2], coef[3]
        resid = x - a * nodes
        logits = -0.5 * (resid**2).sum(-1) / s**2
        w = torch.softmax(logits, 0)
        score = -(w[:, None] * resid).sum(0) / s**2
        drift = f * x - g2 * score
        out = x - h * drift + torch.sqrt(g2 * h) * xi
        return out, out

    jac = dict(jacfwd=torch.func.jacfwd, jacrev=torch.func.jacrev)[jacobian]
    jac_and_value = torch.func.vmap(jac(em, has_aux=True), in_dims=(0, 0, None, None))

    def step(x, q, total, xi, h, coef):
        jac, x = jac_and_value(x, xi, h, coef)
        q, total = _qr_update(q, total, 1.0, jac @ q)
        return x, q, total

    return _maybe_compile(step, compile)


def moons_spectrum(step, z, noise, h: float, coefs):
    """Exponents per step `(m, 2)`, descending. `noise` `(m, steps, 2)`; `coefs`
    `(steps, 4)`: alpha, sigma, f, g^2 at `t_start - i h`."""
    x = torch.tensor(np.array(z), dtype=DTYPE)
    noise = torch.tensor(np.array(noise), dtype=DTYPE)
    noise = noise.transpose(0, 1).contiguous()  # (steps, m, 2): a contiguous slice a step
    coefs = torch.tensor(np.array(coefs), dtype=DTYPE)
    m, steps = x.shape[0], noise.shape[0]
    q = torch.eye(2, dtype=DTYPE).expand(m, 2, 2).clone()
    total = torch.zeros(m, 2, dtype=DTYPE)
    h_t = torch.tensor(h, dtype=DTYPE)
    for i in range(steps):
        x, q, total = step(x, q, total, noise[i], h_t, coefs[i])
    return torch.sort(total / steps, dim=1, descending=True).values.numpy()
