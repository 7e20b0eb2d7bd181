"""Paper 000 Fig. 3: instability of the generation map of a 2-D Gaussian mixture.

(a) the generated density, a small square of noise space (green) and its image
    under G (red);
(b) the intrinsic instability coefficient along y, E_G(z, n_y), on a grid over
    [-1, 1]^2 of noise space, from the exact Jacobian, beside the paper's
    finite-difference estimate (appendix E.1, step 3);
(c) along the dashed line of (b), A_G(z, n_x) and A_G(z, n_y) with the
    Prop. E.1 lower bounds (10 points a segment) and where the bound's condition
    holds.

    python examples/instability_map.py [--grid 201] [--quick] [--out out]

Writes out/instability_map.png and out/instability_map.json.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import Record, parser, progress_chunks  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

import jaxflow as jf  # noqa: E402
from jaxflow.data import FIG3_MEANS, FIG3_VARIANCE, FIG3_WEIGHTS  # noqa: E402

RTOL, ATOL = 1e-6, 1e-8
BATCH = 256  # points a vmap in jf.batch_map


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--grid", type=int, default=None, help="grid points per axis (201)")
    p.add_argument("--line-points", type=int, default=None, help="points on the dashed line")
    p.add_argument("--perturbation", type=float, default=0.05, help="|n| for A_G (c)")
    args = p.parse_args(argv)
    grid = args.grid or (41 if args.quick else 201)
    line_points = args.line_points or (21 if args.quick else 81)
    rec = Record(
        "instability_map",
        args.out,
        dict(
            law=dict(weights=FIG3_WEIGHTS, means=FIG3_MEANS, variance=FIG3_VARIANCE),
            path="RectifiedFlow",
            solver="dopri5 (adaptive)",
            rtol=RTOL,
            atol=ATOL,
            grid=grid,
            line_points=line_points,
            perturbation=args.perturbation,
            prop_e1_points=10,
            quick=args.quick,
        ),
    )
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())

    def gen(z):
        return jf.generate(field, z, rtol=RTOL, atol=ATOL)

    # (b) exact Jacobian on the grid; index [iy, ix] so rows run along y.
    axis = jnp.linspace(-1.0, 1.0, grid)
    zs = jnp.stack(jnp.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    # with a progress bar, in slices of whole batches: the same vmaps, the same numbers.
    # --quick: a batch a grid row, so that no remainder batch compiles a second vmap
    batch = grid if args.quick else BATCH
    x, jac = progress_chunks(
        jax.jit(
            lambda zs: jf.batch_map(
                lambda z: jf.generate_with_jacobian(field, z, rtol=RTOL, atol=ATOL),
                zs,
                batch_size=batch,
            )
        ),
        zs,
        chunk=batch,
        desc="grid",
        quiet=args.quiet,
    )
    x = np.asarray(x).reshape(grid, grid, 2)
    e_y = np.linalg.norm(np.asarray(jac)[:, :, 1], axis=1).reshape(grid, grid)
    # The paper's estimate: forward difference to the next grid point along y.
    h = float(axis[1] - axis[0])
    e_fd = np.linalg.norm(x[1:, :, :] - x[:-1, :, :], axis=-1) / h  # (grid-1, grid)

    # (c) the dashed line runs through the strongest instability on x = 0.
    centre_col = grid // 2
    y_line = float(axis[int(np.argmax(e_y[:, centre_col]))])
    line_x = jnp.linspace(-1.0, 1.0, line_points)
    line = jnp.stack([line_x, jnp.full_like(line_x, y_line)], -1)
    eps = args.perturbation
    out_c = {}
    # n is an argument, not a closure: both directions share one compiled program
    along = jax.jit(
        jax.vmap(
            lambda z, n: (
                jf.instability_coefficient(gen, z, n),
                jf.instability_lower_bound(gen, z, n, 10),
            ),
            in_axes=(0, None),
        )
    )
    for name, n in (("n_x", jnp.array([eps, 0.0])), ("n_y", jnp.array([0.0, eps]))):
        a, b = along(line, n)
        out_c[name] = dict(
            A=np.asarray(a),
            lower_bound=np.asarray(b.bound),
            condition_holds=np.asarray(b.condition),
            bound_respected_where_condition_holds=bool(
                np.all(
                    np.asarray(a)[np.asarray(b.condition)]
                    >= np.asarray(b.bound)[np.asarray(b.condition)] - 1e-12
                )
            ),
        )

    # (a) a small square of noise space on the ridge and its image.
    side = 0.1
    sq_axis = jnp.linspace(-side / 2, side / 2, 25)
    square = jnp.stack(jnp.meshgrid(sq_axis, sq_axis + y_line), -1).reshape(-1, 2)
    image = np.asarray(jax.jit(jax.vmap(gen))(square))

    unstable = e_y > 1
    ys_, xs_ = np.nonzero(unstable)
    corners = {
        "z=(-1,-1)": float(e_y[0, 0]),
        "z=(1,-1)": float(e_y[0, -1]),
        "z=(-1,1)": float(e_y[-1, 0]),
        "z=(1,1)": float(e_y[-1, -1]),
    }
    results = dict(
        axis=np.asarray(axis),
        E_y_exact_max=float(e_y.max()),
        E_y_exact_argmax_z=np.asarray(
            zs.reshape(grid, grid, 2)[np.unravel_index(e_y.argmax(), e_y.shape)]
        ),
        E_y_fd_max=float(e_fd.max()),
        E_y_exact_vs_fd_max_abs_diff=float(np.max(np.abs(e_y[:-1] - e_fd))),
        E_y_exact_vs_fd_median_rel_diff=float(np.median(np.abs(e_y[:-1] - e_fd) / e_y[:-1])),
        fraction_E_y_gt_1=float(unstable.mean()),
        E_y_gt_1_bbox=dict(
            x=[float(axis[xs_.min()]), float(axis[xs_.max()])] if len(xs_) else None,
            y=[float(axis[ys_.min()]), float(axis[ys_.max()])] if len(ys_) else None,
        ),
        E_y_gt_1_mask_rows_along_y=["".join("1" if v else "0" for v in row) for row in unstable],
        E_y_at_corners=corners,
        E_y_centre=float(e_y[grid // 2, grid // 2]),
        dashed_line_y=y_line,
        line_x=np.asarray(line_x),
        panel_c=out_c,
        square=dict(centre=[0.0, y_line], side=side),
        square_image_extent=dict(
            x=[float(image[:, 0].min()), float(image[:, 0].max())],
            y=[float(image[:, 1].min()), float(image[:, 1].max())],
        ),
        E_y_grid=e_y,
    )

    fig, axes = plt.subplots(1, 4, figsize=(22, 5.2))
    ax = axes[0]
    g = np.linspace(-1.2, 1.2, 241)
    pts = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
    logp = np.asarray(jax.jit(jax.vmap(field.law.log_prob))(pts)).reshape(241, 241)
    im = ax.imshow(np.exp(logp), extent=(-1.2, 1.2, -1.2, 1.2), origin="lower", cmap="Blues")
    fig.colorbar(im, ax=ax, label="density $p_{gen}(x)$")
    sq = np.asarray(square)
    ax.scatter(sq[:, 0], sq[:, 1], s=2, c="green", label=f"noise square (side {side})")
    ax.scatter(image[:, 0], image[:, 1], s=2, c="red", label="its image under G")
    ax.set(xlabel="$x_1$", ylabel="$x_2$", title="(a) generated density; green $\\mapsto$ red by G")
    ax.legend(loc="lower left", fontsize=8)

    extent = (-1, 1, -1, 1)
    norm = LogNorm(vmin=max(min(e_y.min(), e_fd.min()), 1e-3), vmax=max(e_y.max(), e_fd.max()))
    ax = axes[1]
    im = ax.imshow(e_y, extent=extent, origin="lower", cmap="magma", norm=norm)
    ax.contour(np.asarray(axis), np.asarray(axis), e_y, levels=[1.0], colors="cyan", linewidths=0.8)
    ax.axhline(y_line, color="white", ls="--", lw=1)
    fig.colorbar(im, ax=ax, label="$\\mathcal{E}_G(z, n_y)$ (log scale)")
    ax.set(
        xlabel="$z_1$",
        ylabel="$z_2$",
        title=f"(b) exact $\\mathcal{{E}}_G(z,n_y)$, max {e_y.max():.3g}; cyan: E = 1",
    )
    ax = axes[2]
    im = ax.imshow(e_fd, extent=(-1, 1, -1, 1 - h), origin="lower", cmap="magma", norm=norm)
    fig.colorbar(im, ax=ax, label="finite-difference estimate (log scale)")
    ax.set(
        xlabel="$z_1$",
        ylabel="$z_2$",
        title=f"(b') paper's finite difference (h = {h:.3g}), max {e_fd.max():.3g}",
    )
    ax = axes[3]
    for name, colour in (("n_x", "tab:blue"), ("n_y", "tab:orange")):
        c = out_c[name]
        lx = np.asarray(line_x)
        ax.plot(lx, c["A"], color=colour, label=f"$A_G(z, {name})$")
        ax.plot(lx, c["lower_bound"], color=colour, ls="--", label=f"Prop. E.1 bound, {name}")
        bad = ~c["condition_holds"]
        ax.scatter(
            lx[bad],
            c["lower_bound"][bad],
            facecolors="none",
            edgecolors=colour,
            s=25,
            label=f"condition fails ({name})" if bad.any() else None,
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set(
        xlabel="$z_1$ on the dashed line",
        ylabel="instability coefficient",
        title=f"(c) $|n| = {eps}$ along $z_2 = {y_line:.2f}$",
    )
    ax.legend(fontsize=7)
    fig.suptitle(
        "Paper 000 Fig. 3: instability of the rectified-flow generation map "
        "(3-component mixture, exact Jacobians by jaxflow)"
    )
    fig.tight_layout()
    fig.savefig(rec.png_path(), dpi=110)
    path = rec.write(results)
    print(
        f"E_y = |dG/dz_y| over the {grid}x{grid} grid of z: exact (Jacobian) max {e_y.max():.4g} "
        f"at z = {results['E_y_exact_argmax_z'].round(3).tolist()}; the paper's forward "
        f"difference to the next grid point (h = {h:.3g}) max {e_fd.max():.4g}"
    )
    print(
        f"exact E_y > 1 on {100 * unstable.mean():.2f}% of the grid; "
        f"centre E_y = {results['E_y_centre']:.3g}; "
        f"corners {', '.join(f'{k}: {v:.2g}' for k, v in corners.items())}"
    )
    for name in ("n_x", "n_y"):
        c = out_c[name]
        print(
            f"(c) {name}, |n| = {eps} along z_2 = {y_line:.2f}: max A = {c['A'].max():.3g}, "
            f"Prop. E.1 condition holds at "
            f"{int(c['condition_holds'].sum())}/{line_points} points, bound respected there: "
            f"{c['bound_respected_where_condition_holds']}"
        )
    print(f"wrote {rec.png_path()} and {path} in {rec.data['wall_time_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
