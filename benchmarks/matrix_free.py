"""Top-10 singular values of a generation map's Jacobian, matrix-free: jaxflow
against a PyTorch route and the dense route, in one process.

The map: `G`, rectified flow, Euler with `--steps` (100) equal steps, through the
exact velocity of an isotropic Gaussian mixture of `--components` (300) components
in `R^n` (means N(0, I), variances in [0.05, 0.5], float32), for n = 4,096 and
65,536 (`--sizes`). Its Jacobian `J_G(z)` at one noise point `z` is never formed.

- jaxflow: `jf.top_singular_values(jf.generation_map(field, ...), z, 10, key=...)`:
  JVPs by forward mode, VJPs through the checkpointed reverse solve, block
  Golub-Kahan-Lanczos; compiled once (compile time reported apart), then timed.
- PyTorch: what a researcher writes without jaxflow: the same mixture velocity
  and Euler loop in torch, `torch.func.jvp` through the loop for `J v`, a manual
  reverse loop of per-step `torch.func.vjp` over the saved states for `J^T u`
  (one `vjp` of the whole loop would keep every step's intermediates:
  `steps x K x n` floats, 8 GB at n = 65,536), and Golub-Kahan-Lanczos with full
  reorthogonalisation, stopped by the same residual test.
- dense (n = 4,096 only): `jax.jacfwd` in blocks of 256 JVPs, one block timed and
  scaled by n / 256, plus the SVD of an n x n matrix, timed.

Reported per size: one evaluation of G (jaxflow and torch), the top-10 time in
G-evaluations (goal: at most 40), jaxflow / torch speed-up (goal: at least 2x on
the same CPU), the number of JVP and VJP products, the cores busy during each
timed call (process CPU time / wall time), compile time apart, and the accuracy:
jaxflow's top-10 against torch's (an independent implementation), G's two
implementations against each other, and at `--check-n` (256) both against the
dense SVD.

    python benchmarks/matrix_free.py [--sizes 4096,65536] [--repeats 3]
"""

import argparse
import json
import os
import platform
import resource
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jaxflow as jf


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, repeats: int, warm_up: bool = True):
    """Median wall time of `repeats` calls after a warm-up (none for eager torch,
    which compiles nothing: at n = 65,536 one PyTorch Lanczos run takes the better
    part of an hour on 2 cores), the cores busy (CPU time / wall time over the
    timed calls) and the last output."""
    out = fn() if warm_up else None
    walls, cpu0 = [], cpu_seconds()
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t)
    busy = (cpu_seconds() - cpu0) / max(sum(walls), 1e-12)
    return float(np.median(walls)), busy, out


def mixture(n: int, components: int, seed: int):
    rng = np.random.default_rng(seed)
    weights = np.full(components, 1.0 / components, np.float32)
    means = rng.standard_normal((components, n)).astype(np.float32)
    variances = rng.uniform(0.05, 0.5, components).astype(np.float32)
    return weights, means, variances


# ---- PyTorch ------------------------------------------------------------------


def torch_route(weights, means, variances, z, steps, k, tol, max_iterations, repeats, seed):
    import torch
    from torch.func import jvp, vjp

    torch.manual_seed(seed)
    log_w = torch.from_numpy(np.log(weights))
    mu = torch.from_numpy(means)
    lam = torch.from_numpy(variances)[:, None]
    n = means.shape[1]

    def velocity(x, t):
        # rectified flow: alpha = 1 - t, sigma = t; v = alpha' D - sigma sigma' s
        alpha, sigma = 1.0 - t, t
        c = alpha**2 * lam + sigma**2  # (K, 1)
        y = x[None, :] - alpha * mu  # (K, n)
        logits = log_w - 0.5 * ((y**2) / c).sum(1) - 0.5 * n * torch.log(c[:, 0])
        r = torch.softmax(logits, 0)[:, None]
        d = (r * (mu + alpha * lam / c * y)).sum(0)
        s = (r * (-y / c)).sum(0)
        return -d - sigma * s

    grid = torch.linspace(1.0, 0.0, steps + 1)

    def step(x, i):
        return x + (grid[i + 1] - grid[i]) * velocity(x, grid[i])

    def generate(x):
        for i in range(steps):
            x = step(x, i)
        return x

    z_t = torch.from_numpy(np.asarray(z))
    with torch.no_grad():
        t_g, busy_g, g = timed(lambda: generate(z_t), repeats)
        states = [z_t]
        for i in range(steps):
            states.append(step(states[-1], i))

    def jvp_fn(v):
        return jvp(generate, (z_t,), (v,))[1]

    def vjp_fn(u):
        for i in reversed(range(steps)):
            u = vjp(lambda x, i=i: step(x, i), states[i])[1](u)[0]
        return u

    def lanczos():
        return golub_kahan(jvp_fn, vjp_fn, n, k, tol, max_iterations, torch)

    t_top, busy_top, (values, products) = timed(lanczos, max(1, repeats - 1), warm_up=False)
    return dict(
        generate_s=t_g,
        generate_busy=busy_g,
        top_s=t_top,
        top_busy=busy_top,
        values=values,
        products=products,
        G=g.numpy(),
    )


def golub_kahan(jvp_fn, vjp_fn, n, k, tol, max_iterations, torch):
    """Golub-Kahan-Lanczos bidiagonalisation from one random vector with full
    reorthogonalisation; stops when the top-k Ritz triplets' residual bounds
    `|beta_m y_i[m]|` are at most `tol * s_1`. Returns (values, products)."""
    v = torch.randn(n)
    v = v / v.norm()
    vs, us, alphas, betas = [v], [], [], []
    u = jvp_fn(v)
    products = 1
    for _ in range(max_iterations):
        for w in us:
            u = u - (w @ u) * w
        a = u.norm()
        u = u / a
        us.append(u)
        alphas.append(a)
        w = vjp_fn(u) - a * vs[-1]
        products += 1
        for q in vs:
            w = w - (q @ w) * q
        b = w.norm()
        betas.append(b)
        m = len(alphas)
        bidiagonal = torch.diag(torch.stack(alphas))
        if m > 1:
            bidiagonal += torch.diag(torch.stack(betas[:-1]), 1)
        left, values, _ = torch.linalg.svd(bidiagonal)
        if m >= k:
            bounds = (b * left[-1, :k]).abs()
            if bool((bounds <= tol * values[0]).all()):
                break
        v = w / b
        vs.append(v)
        u = jvp_fn(v) - b * u
        products += 1
    return values[:k].numpy(), products


# ---- jaxflow ------------------------------------------------------------------


@jax.jit
def _generate(g, z):
    return g(z)


@partial(jax.jit, static_argnames=("k", "tol", "block"))
def _top(g, z, key, k, tol, block):
    return jf.top_singular_values(g, z, k, key=key, tol=tol, block_size=block)


def jaxflow_route(weights, means, variances, z, steps, k, tol, repeats, seed, block):
    law = jf.GaussianMixture(weights, means, variances)
    field = jf.AnalyticField(law, jf.RectifiedFlow())
    g = jf.generation_map(field, solver="euler", steps=steps)
    key = jax.random.key(seed)
    z = jnp.asarray(z)

    # module-level jits, the map an argument: a second problem of the same n (the
    # accuracy check's and a size's, in the smoke test) reuses the compiled programs
    t0 = time.perf_counter()
    generate = _generate.lower(g, z).compile()
    compile_g = time.perf_counter() - t0
    t0 = time.perf_counter()
    top = _top.lower(g, z, key, k=k, tol=tol, block=block).compile()
    compile_top = time.perf_counter() - t0

    t_g, busy_g, x = timed(lambda: jax.block_until_ready(generate(g, z)), repeats)
    t_top, busy_top, out = timed(lambda: jax.block_until_ready(top(g, z, key)), repeats)
    return dict(
        generate_s=t_g,
        generate_busy=busy_g,
        generate_compile_s=compile_g,
        top_s=t_top,
        top_busy=busy_top,
        top_compile_s=compile_top,
        values=np.asarray(out.values),
        residuals=np.asarray(out.residuals),
        converged=bool(np.all(out.converged)),
        # each block step: `block` JVPs and `block` VJPs, batched
        products=2 * int(out.iterations) * block,
        iterations=int(out.iterations),
        G=np.asarray(x),
        g=g,
        z=z,
    )


# `J_G(z) V`, one JVP a column of V: the dense route's blocks and the accuracy
# check's whole Jacobian (V = I), one compiled program where their shapes agree
_jvps = jax.jit(jax.vmap(lambda g, z, v: jax.jvp(g, (z,), (v,))[1], (None, None, 1), 1))


def dense_route(g, z, block: int):
    n = z.shape[0]
    block = min(block, n)
    tangents = jnp.eye(n, block, dtype=z.dtype)
    _jvps(g, z, tangents).block_until_ready()
    t0 = time.perf_counter()
    _jvps(g, z, tangents).block_until_ready()
    t_block = time.perf_counter() - t0
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    t0 = time.perf_counter()
    np.linalg.svd(a, compute_uv=False)
    t_svd = time.perf_counter() - t0
    return dict(jacobian_s=t_block * n / block, svd_s=t_svd, total_s=t_block * n / block + t_svd)


def accuracy_check(n, components, steps, k, tol, seed, block):
    """At a small n: jaxflow's and torch's top-k against the dense SVD."""
    weights, means, variances = mixture(n, components, seed)
    z = np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)
    ours = jaxflow_route(weights, means, variances, z, steps, k, tol, 1, seed, block)
    theirs = torch_route(weights, means, variances, z, steps, k, tol, 4 * n, 1, seed)
    jacobian = _jvps(ours["g"], ours["z"], jnp.eye(n, dtype=ours["z"].dtype))
    dense = np.linalg.svd(np.asarray(jacobian), compute_uv=False)[:k]
    return dict(
        n=n,
        jaxflow_vs_dense=float(np.max(np.abs(ours["values"] - dense) / dense)),
        torch_vs_dense=float(np.max(np.abs(theirs["values"] - dense) / dense)),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,65536")
    p.add_argument("--components", type=int, default=300)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4, help="residual / s_1 for both routes")
    p.add_argument("--block-size", type=int, default=20, help="jaxflow's Krylov block")
    p.add_argument(
        "--torch-max-iterations",
        type=int,
        default=200,
        help="the PyTorch Lanczos's cap (200: 400 products, jaxflow's default cap at b = 20)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-n", type=int, default=256, help="accuracy check size (0: none)")
    p.add_argument("--dense-max", type=int, default=4096, help="largest n for the dense route")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="matrix_free.json")
    args = p.parse_args(argv)
    import torch

    results = dict(
        machine=dict(
            platform=platform.platform(),
            cpus=os.cpu_count(),
            jax=jax.__version__,
            torch=torch.__version__,
            device=str(jax.devices()[0]),
            torch_threads=torch.get_num_threads(),
        ),
        settings=vars(args),
        check=accuracy_check(
            args.check_n, args.components, args.steps, args.k, args.tol, 1, args.block_size
        )
        if args.check_n
        else None,
        sizes=[],
    )
    print(f"accuracy at n = {args.check_n}: {results['check']}", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        weights, means, variances = mixture(n, args.components, args.seed)
        z = np.random.default_rng(args.seed + 1).standard_normal(n).astype(np.float32)
        problem = (weights, means, variances, z, args.steps, args.k, args.tol)
        ours = jaxflow_route(*problem, args.repeats, args.seed, args.block_size)
        # printed before the PyTorch route runs, which takes far longer at large n
        print(
            f"n = {n}, jaxflow: G {ours['generate_s']:.3g} s, top-{args.k} "
            f"{ours['top_s']:.3g} s = {ours['top_s'] / ours['generate_s']:.1f} G, "
            f"{ours['iterations']} block steps, converged {ours['converged']}, compile "
            f"{ours['generate_compile_s'] + ours['top_compile_s']:.1f} s, busy "
            f"{ours['top_busy']:.1f}, values {np.array2string(ours['values'], precision=5)}",
            flush=True,
        )
        theirs = torch_route(*problem, args.torch_max_iterations, args.repeats, args.seed)
        dense = dense_route(ours["g"], ours["z"], 256) if n <= args.dense_max else None
        rec = dict(
            n=n,
            jaxflow={
                k: v for k, v in ours.items() if k not in ("G", "g", "z", "values", "residuals")
            },
            torch={k: v for k, v in theirs.items() if k not in ("G", "values")},
            dense=dense,
            values=ours["values"].tolist(),
            top_in_G=ours["top_s"] / ours["generate_s"],
            speedup_vs_torch=theirs["top_s"] / ours["top_s"],
            values_vs_torch=float(
                np.max(np.abs(ours["values"] - theirs["values"]) / theirs["values"])
            ),
            G_vs_torch=float(np.max(np.abs(ours["G"] - theirs["G"])) / np.max(np.abs(theirs["G"]))),
        )
        results["sizes"].append(rec)
        rows.append(rec)
        print(json.dumps(rec, default=float), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)
    print()
    header = (
        "n",
        "G jaxflow s",
        "G torch s",
        "top-10 jaxflow s (in G)",
        "top-10 torch s",
        "speed-up",
        "products jaxflow / torch",
        "cores busy jaxflow / torch",
        "compile s",
        "max rel diff vs torch",
        "dense s",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        j, t = r["jaxflow"], r["torch"]
        dense = "n/a" if r["dense"] is None else f"{r['dense']['total_s']:.0f}"
        print(
            f"| {r['n']:,} | {j['generate_s']:.3f} | {t['generate_s']:.3f} | "
            f"{j['top_s']:.2f} ({r['top_in_G']:.1f}) | {t['top_s']:.2f} | "
            f"{r['speedup_vs_torch']:.2f}x | {j['products']} / {t['products']} | "
            f"{j['top_busy']:.1f} / {t['top_busy']:.1f} | {j['top_compile_s']:.1f} | "
            f"{r['values_vs_torch']:.1e} | {dense} |"
        )


if __name__ == "__main__":
    main()
