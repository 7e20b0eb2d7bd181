"""The singular spectrum of the digits UNet's generation map against its Lyapunov
spectrum (paper 003's comparison, paper 000's measure), dense and matrix-free, and
the top singular values matrix-free at 16x16 and 32x32 digits.

The generation map `G` is the PF-ODE of the `UNet` trained on scikit-learn's 8x8
digits (`_digits.py`, the cached model `digits_lyapunov.py` and
`digits_reconstruction.py` share), integrated by a fixed-step solver (tsit5; euler
under `--quick`, whose checks are identities that hold for any solver) on a
geometric time grid from `T(1 - 1e-3)` down to `1e-3` (the OU velocity of a noise
model is stiff near t = 0). The trained float32 weights are cast to float64 for the
analysis (`--dtype float32` keeps them), so that the routes below can be compared
to round-off. At a few noise points `z` (n = 64):

1. the full singular spectrum of `J_G(z)`, dense (`jf.jacobian`: 64 JVPs, then
   an SVD; the same `J_G` gives `log|det J_G|` and the smallest route's check);
2. the top `k` by `jf.top_singular_values` on `jf.generation_map(field, ...)`
   with the same solver settings (block Golub-Kahan-Lanczos: JVPs by forward
   mode, VJPs through a checkpointed reverse solve), checked against 1;
3. the smallest few by `jf.smallest_singular_values` (the top of the inverse
   map's Jacobian at `G(z)`, the inverse solved on the same grid), checked against
   the dense spectrum of that solved inverse (to round-off) and against 1 (up to
   how well the solved `G^{-1}` inverts the solved `G`), with the function's own
   certificate against `G` (`|J_G v_i|` against `s_i`, and the Jacobian round trip
   `J_{G^-1} J_G w` against `w`). Under `--quick` the Euler inversion of 12 steps
   is far from inverting Euler generation, and the certificate says so
   (`converged` False, the mismatch recorded): the values are the solved
   inverse's, not `J_G`'s;
4. the finite-time Lyapunov spectrum of the same discrete generation
   (`jf.lyapunov_spectrum_of_map`, one solver step per map, QR iteration): its
   exponents per unit time times the span `T`, `lambda_i T`, against `log s_i`.
   `sum_i lambda_i T = sum_i log s_i = log|det J_G|` exactly (both are the
   log-determinant of one product of step Jacobians); the leading ones are close,
   not equal (the QR frame's stretches are not singular values of the product).

Then, at 16x16 (n = 256) and 32x32 (n = 1024): the 8x8 digits upsampled
bilinearly (`jax.image.resize`), a UNet trained briefly at each size the way
`_digits.py` trains the 8x8 one (cached beside it), and the top `k` singular values
of `J_G(z)` matrix-free at a few `z`, with residuals, convergence and wall time;
at 16x16 also the dense spectrum (256 JVPs) as a check and for its wall time.

    python examples/digits_singular_values.py [--points 3] [--k 8] [--sizes 16 32]

Writes out/digits_singular_values.png and .json; trained weights under `--cache`
(default out/cache).
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import Record, parser, progress  # noqa: E402
from _digits import (  # noqa: E402
    T_MIN,
    T_NOISE,
    add_model_arguments,
    digits_field,
    model_settings,
    train_unet,
)

import jaxflow as jf  # noqa: E402


def upsampled_digits(size: int) -> np.ndarray:
    """The 1797 digits, 8x8 resized bilinearly to `size` x `size`, flat, float32."""
    data, _ = jf.data.digits(8)
    images = jax.image.resize(
        jnp.asarray(data).reshape(-1, 8, 8), (len(data), size, size), "linear"
    )
    return np.asarray(images.reshape(len(data), -1), np.float32)


def train_at_size(args, size: int):
    """`(field, info)`: a UNet trained at `size` x `size` as `_digits.py` trains the
    8x8 one, briefly (smaller batches and warm-up); cached under `args.cache`."""
    # the 8x8 model's levels (`_digits.model_settings`: one fewer under --quick), one
    # more above 16 x 16
    mult = args.multipliers + ((2,) if size > 16 else ())
    steps = args.big_train_steps
    field, info = train_unet(
        upsampled_digits(size),
        args.cache,
        seed=args.seed,
        name=f"digits{size}",
        size=size,
        multipliers=mult,
        channels=args.big_channels,
        steps=steps,
        batch=args.big_batch,
        warmup=50,
        chunk=50,
        # keys apart from the 8x8 model's; one checkpoint, at the end, for a short run
        seed_offset=11,
        checkpoint_every=max(steps, 1),
        progress=not args.quiet,
    )
    return field, dict(n=size * size, multipliers=mult, train_steps=steps, **info)


@eqx.filter_jit
def cast(tree, dtype):
    """`tree` with its float arrays cast to `dtype`, in one program (eagerly, each
    leaf shape would compile its own conversion)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def timed(fn, *a):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    return out, time.perf_counter() - start


def main(argv=None):
    p = parser(__doc__)
    add_model_arguments(p)
    p.add_argument("--points", type=int, default=None, help="noise points at n = 64 (3)")
    p.add_argument("--k", type=int, default=None, help="top singular values (8)")
    p.add_argument("--smallest", type=int, default=None, help="smallest singular values (4)")
    p.add_argument("--steps", type=int, default=None, help="tsit5 steps, geometric grid (40)")
    p.add_argument("--solver", default=None, help="fixed-step solver (tsit5; euler with --quick)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="larger sizes (16 32)")
    p.add_argument("--big-points", type=int, default=None, help="points per larger size (1)")
    p.add_argument("--big-steps", type=int, default=None, help="solver steps there (16)")
    p.add_argument("--big-train-steps", type=int, default=None, help="training there (300)")
    p.add_argument("--big-channels", type=int, default=None, help="UNet channels there (8)")
    args = p.parse_args(argv)
    points = args.points or (1 if args.quick else 3)
    k = args.k or (4 if args.quick else 8)
    n_small = args.smallest or (2 if args.quick else 4)
    steps = args.steps or (12 if args.quick else 40)
    # the quick run checks identities, which hold for any solver; euler's one stage
    # compiles the reverse pass through the UNet several times faster than tsit5's six
    args.solver = args.solver or ("euler" if args.quick else "tsit5")
    sizes = args.sizes if args.sizes is not None else ([16] if args.quick else [16, 32])
    big_points = args.big_points or 1
    # the quick run's larger size checks the matrix-free route against dense on a
    # short map (two steps) of a model trained a few small batches: running costs
    # little there, and every program is compiled as in the full run
    big_steps = args.big_steps or (2 if args.quick else 16)
    args.big_train_steps = args.big_train_steps or (10 if args.quick else 300)
    args.big_batch = 16 if args.quick else 64
    args.big_channels = args.big_channels or 8
    rec = Record(
        "digits_singular_values",
        args.out,
        dict(
            model=model_settings(args),
            points=points,
            k=k,
            smallest=n_small,
            solver=f"{args.solver}, {steps} steps, geometric times from T(1 - 1e-3) to 1e-3",
            dtype=args.dtype,
            sizes=sizes,
            big=dict(
                data="8x8 digits resized bilinearly (jax.image.resize 'linear')",
                points=big_points,
                solver=f"{args.solver}, {big_steps} steps, same geometric grid",
                train_steps=args.big_train_steps,
                channels=args.big_channels,
                batch=args.big_batch,
                dtype="float32",
            ),
            seed=args.seed,
        ),
    )
    # train (or load) every model in float32 first; then float64 for the analysis
    field32, _, info = digits_field(args)
    big_fields = {}
    for size in sizes:
        big_fields[size] = train_at_size(args, size)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    field = cast(field32, dtype)
    n = 64
    times = np.geomspace(T_MIN, T_NOISE * (1 - 1e-3), steps + 1)
    span = float(times[-1] - times[0])
    G = jf.generation_map(field, solver=args.solver, times=times)
    G_inv = jf.generation_map(field, solver=args.solver, times=times, inverse=True)
    desc = jnp.asarray(times[::-1].copy(), dtype)

    def step(x, i):  # one solver step of the same grid: G is their composition
        return jf.generate(
            field, x, solver=args.solver, steps=1, t_noise=desc[i], t_data=desc[i + 1]
        )

    # the dense J_G, once: its SVD, log|det| and the products |J_G v| come from it on
    # the host (one forward-mode program through the UNet, not one per quantity)
    dense = eqx.filter_jit(lambda g, z: jf.jacobian(g, z))
    top = eqx.filter_jit(lambda g, z, key: jf.top_singular_values(g, z, k, key=key))
    small = eqx.filter_jit(lambda g, z, key: jf.smallest_singular_values(g, z, n_small, key=key))
    lyap = jax.jit(
        lambda z: (
            jf.lyapunov_spectrum_of_map(
                step, z, steps, save_stretch=False, key=jax.random.PRNGKey(0)
            ).exponents
        )
    )

    @eqx.filter_jit
    def references(g, gi, z):
        """The untimed references, one program: the dense spectrum of the solved
        inverse at G(z) (the smallest route's own reference) and the reconstruction
        G^-1(G(z)) - z."""
        x = g(z)

        def with_value(x):  # G^-1(x) with its Jacobian: one solve for both
            back = gi(x)
            return back, back

        jac_inv, back = jax.jacfwd(with_value, has_aux=True)(x)
        return jnp.linalg.svd(jac_inv, compute_uv=False), back - z

    kz, kl = jax.random.split(jax.random.PRNGKey(args.seed + 20))
    zs = jax.random.normal(kz, (points, n), dtype)
    rows = []
    for j in progress(range(points), desc="n = 64", quiet=args.quiet):
        z, key = zs[j], jax.random.fold_in(kl, j)
        jac, t_dense = timed(dense, G, z)
        jac = np.asarray(jac, np.float64)
        s = np.linalg.svd(jac, compute_uv=False)
        tk, t_top = timed(top, G, z, key)
        sm, t_small = timed(small, G, z, key)
        s_inv, recon = (np.asarray(a, np.float64) for a in references(G, G_inv, z))
        log_det = np.linalg.slogdet(jac)[1]
        # |J_G v_i| for the smallest route's right vectors: its certificate's forward
        # check, by the dense Jacobian
        jv = np.linalg.norm(jac @ np.asarray(sm.right, np.float64), axis=0)
        s_inv = np.sort(1.0 / s_inv)[:n_small]
        ex, t_lyap = timed(lyap, z)
        ex = np.asarray(ex, np.float64)
        log_stretch = ex * steps  # lambda_i T: per-step exponents times the steps
        rows.append(
            dict(
                singular_values_dense=s,
                log_singular_values_dense=np.log(s),
                log_abs_det_dense=float(log_det),
                top_k=np.asarray(tk.values),
                top_k_residuals=np.asarray(tk.residuals),
                top_k_converged=np.asarray(tk.converged),
                top_k_iterations=int(tk.iterations),
                top_k_rel_diff_vs_dense=np.abs(np.asarray(tk.values) - s[:k]) / s[:k],
                smallest=np.asarray(sm.values),
                smallest_residuals=np.asarray(sm.residuals),
                smallest_converged=np.asarray(sm.converged),
                # the certificate against G: | |J_G v_i| - s_i | / s_i and the Jacobian
                # round trip |J_{G^-1} J_G w - w| / |w|; and |J_G v_i| by the dense J_G
                smallest_forward_errors=np.asarray(sm.forward_errors),
                smallest_round_trip_error=float(sm.round_trip_error),
                smallest_dense_forward=jv,
                smallest_dense_inverse=s_inv,
                smallest_rel_diff_vs_dense_inverse=np.abs(np.asarray(sm.values) - s_inv) / s_inv,
                smallest_rel_diff_vs_dense=np.abs(np.asarray(sm.values) - s[::-1][:n_small])
                / s[::-1][:n_small],
                reconstruction_error=float(np.linalg.norm(recon)),
                lyapunov_exponents_per_unit_time=log_stretch / span,
                lyapunov_times_T=log_stretch,
                sum_log_s=float(np.sum(np.log(s))),
                sum_lyapunov_times_T=float(np.sum(log_stretch)),
                seconds=dict(dense=t_dense, top_k=t_top, smallest=t_small, lyapunov=t_lyap),
            )
        )
    r0 = rows[0]
    max_top = max(float(r["top_k_rel_diff_vs_dense"].max()) for r in rows)
    max_small = max(float(r["smallest_rel_diff_vs_dense"].max()) for r in rows)
    max_small_inv = max(float(r["smallest_rel_diff_vs_dense_inverse"].max()) for r in rows)
    sum_diff = max(abs(r["sum_log_s"] - r["sum_lyapunov_times_T"]) for r in rows)
    lead_diff = np.array([r["log_singular_values_dense"] - r["lyapunov_times_T"] for r in rows])
    print(
        f"training (8x8): {info['train_seconds']:.0f} s, final loss {info['final_loss']}; "
        + "; ".join(
            f"{s}x{s}: {bi['train_seconds']:.0f} s, loss {bi['final_loss']}"
            for s, (_, bi) in big_fields.items()
        )
    )
    print(
        f"n = 64, {points} points, {args.solver} {steps} steps, {args.dtype}: s_1 "
        + ", ".join(f"{r['singular_values_dense'][0]:.4g}" for r in rows)
        + "; s_64 "
        + ", ".join(f"{r['singular_values_dense'][-1]:.4g}" for r in rows)
    )
    print(
        f"top {k} matrix-free vs dense: max rel. diff {max_top:.2e}, converged "
        f"{all(bool(r['top_k_converged'].all()) for r in rows)}, iterations "
        f"{[r['top_k_iterations'] for r in rows]}; smallest {n_small} (inverse map): "
        f"max rel. diff {max_small_inv:.2e} vs the dense inverse's, {max_small:.2e} vs "
        f"dense J_G's, converged (certified against G) "
        f"{all(bool(r['smallest_converged'].all()) for r in rows)}: max | |J_G v| / s - 1 | "
        f"{max(float(r['smallest_forward_errors'].max()) for r in rows):.1e}, Jacobian "
        "round trip "
        + ", ".join(f"{r['smallest_round_trip_error']:.1e}" for r in rows)
        + "; reconstruction error |G^-1(G(z)) - z| "
        + ", ".join(f"{r['reconstruction_error']:.1e}" for r in rows)
    )
    print(
        "sum log s_i vs sum lambda_i T: "
        + ", ".join(f"{r['sum_log_s']:.6f} / {r['sum_lyapunov_times_T']:.6f}" for r in rows)
        + f" (max |diff| {sum_diff:.1e}); log s_i - lambda_i T (point 0) at i = 1, 2, 8, "
        f"32, 64: " + ", ".join(f"{lead_diff[0, i - 1]:+.3f}" for i in (1, 2, 8, 32, 64))
    )
    print(
        "wall time, point 0: dense {dense:.2f} s, top-k {top_k:.2f} s, smallest "
        "{smallest:.2f} s, Lyapunov {lyapunov:.2f} s (each includes compilation)".format(
            **r0["seconds"]
        )
    )

    # ---- larger digits: top-k matrix-free ----------------------------------------
    big = {}
    for size, (bf, binfo) in big_fields.items():
        nb = size * size
        bgrid = np.geomspace(T_MIN, T_NOISE * (1 - 1e-3), big_steps + 1)
        Gb = jf.generation_map(bf, solver=args.solver, times=bgrid)
        zb = jax.random.normal(
            jax.random.PRNGKey(args.seed + 30 + size), (big_points, nb), jnp.float32
        )
        out = []
        for j in progress(range(big_points), desc=f"{size}x{size}", quiet=args.quiet):
            key = jax.random.fold_in(kl, 100 + j)
            tk, t_top = timed(top, Gb, zb[j], key)  # includes compilation at j = 0
            entry = dict(
                values=np.asarray(tk.values),
                residuals=np.asarray(tk.residuals),
                relative_residuals=np.asarray(tk.residuals) / float(tk.values[0]),
                converged=np.asarray(tk.converged),
                iterations=int(tk.iterations),
                seconds_top_k=t_top,
            )
            if size <= 16:
                sd, t_dense = timed(dense, Gb, zb[j])
                sd = np.linalg.svd(np.asarray(sd, np.float64), compute_uv=False)
                entry.update(
                    dense_top=sd[:k],
                    rel_diff_vs_dense=np.abs(entry["values"] - sd[:k]) / sd[:k],
                    seconds_dense=t_dense,
                    dense_all=sd,
                )
            out.append(entry)
        big[size] = dict(training=binfo, points=out)
        e = out[0]
        line = (
            f"{size}x{size} (n = {nb}), {args.solver} {big_steps} steps, float32: top {k} "
            + ", ".join(f"{v:.4g}" for v in e["values"])
            + f"; max rel. residual {max(x['relative_residuals'].max() for x in out):.1e}, "
            f"converged {all(bool(x['converged'].all()) for x in out)}, iterations "
            f"{[x['iterations'] for x in out]}; matrix-free {e['seconds_top_k']:.2f} s"
        )
        if "seconds_dense" in e:
            line += (
                f", dense {e['seconds_dense']:.2f} s (rel. diff "
                f"{max(x['rel_diff_vs_dense'].max() for x in out):.1e})"
            )
        print(line)

    results = dict(
        training=info,
        span_T=span,
        n64=rows,
        n64_max_top_k_rel_diff=max_top,
        n64_max_smallest_rel_diff=max_small,
        n64_max_smallest_rel_diff_vs_dense_inverse=max_small_inv,
        n64_max_abs_sum_log_s_minus_sum_lyapunov_T=sum_diff,
        n64_log_s_minus_lyapunov_T_mean=lead_diff.mean(0),
        larger={str(s): v for s, v in big.items()},
    )

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    idx = np.arange(1, n + 1)
    for j, r in enumerate(rows):
        lab = j == 0
        ax.plot(
            idx,
            r["log_singular_values_dense"],
            "k-",
            lw=1,
            label="log $s_i$ (dense)" if lab else None,
        )
        ax.plot(
            idx,
            r["lyapunov_times_T"],
            "C3--",
            lw=1,
            label="$\\lambda_i T$ (Lyapunov)" if lab else None,
        )
        ax.plot(
            idx[:k],
            np.log(r["top_k"]),
            "C0o",
            ms=5,
            mfc="none",
            label=f"top {k}, matrix-free" if lab else None,
        )
        ax.plot(
            idx[::-1][:n_small],
            np.log(r["smallest"]),
            "C2s",
            ms=5,
            mfc="none",
            label=f"smallest {n_small}, matrix-free" if lab else None,
        )
    ax.set_xlabel("index i")
    ax.set_ylabel("log singular value / $\\lambda_i T$")
    ax.set_title("digits 8x8 (n = 64): $J_G$ against the Lyapunov spectrum", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for r in rows:
        ax.plot(idx, r["log_singular_values_dense"] - r["lyapunov_times_T"], "-", lw=1)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("index i")
    ax.set_ylabel("log $s_i$ - $\\lambda_i T$")
    ax.set_title(f"difference (sums agree to {sum_diff:.0e})", fontsize=9)
    ax = axes[2]
    for c, (size, b) in enumerate(big.items()):
        for j, e in enumerate(b["points"]):
            ax.semilogy(
                np.arange(1, k + 1),
                e["values"],
                "o-",
                color=f"C{c}",
                ms=4,
                lw=1,
                label=f"{size}x{size} top {k}" if j == 0 else None,
            )
            if "dense_all" in e:
                ax.semilogy(
                    np.arange(1, k + 1),
                    e["dense_top"],
                    "kx",
                    ms=5,
                    label="dense (16x16)" if j == 0 and c == 0 else None,
                )
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value of $J_G$")
    ax.set_title("top-k matrix-free at larger digits", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=120)
    print("wrote", rec.png_path(), rec.write(results))


if __name__ == "__main__":
    main()
