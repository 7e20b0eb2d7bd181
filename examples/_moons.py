"""The two-moons target of paper 003 (appendix G.2) shared by its examples: the
arc-length measure on two half circles as an `Empirical` law on quadrature nodes,
the cosine path, and Euler-Maruyama on the reverse SDE (appendix G.1)."""

import jax.numpy as jnp
import numpy as np

import jaxflow as jf

LIMITS = (-1.5, 2.5, -1.25, 1.75)


def moons(nodes_per_moon):
    """Quadrature nodes (midpoint rule in arc length) and unit tangents:
    upper (cos u, sin u), lower (1 - cos u, 1/2 - sin u), u in [0, pi]."""
    u = (np.arange(nodes_per_moon) + 0.5) / nodes_per_moon * np.pi
    upper = np.stack([np.cos(u), np.sin(u)], -1)
    lower = np.stack([1 - np.cos(u), 0.5 - np.sin(u)], -1)
    t_upper = np.stack([-np.sin(u), np.cos(u)], -1)
    t_lower = np.stack([np.sin(u), -np.cos(u)], -1)
    return np.concatenate([upper, lower]), np.concatenate([t_upper, t_lower])


def moons_field(nodes):
    return jf.AnalyticField(jf.Empirical(jnp.asarray(nodes)), jf.Cosine())


def smooth_chi():
    """A smooth error field with no relation to the moons, sup norm 1:
    `(cos(1.3 x2 + 0.4), sin(1.7 x1 - 0.2)) / sqrt 2`."""

    def chi(x):
        return jnp.stack([jnp.cos(1.3 * x[1] + 0.4), jnp.sin(1.7 * x[0] - 0.2)]) / jnp.sqrt(2.0)

    return chi


def distance_to_nodes(x, nodes):
    """Distance of each row of `x` to the nearest node, and that node's index."""
    d2 = ((x[:, None, :] - nodes[None]) ** 2).sum(-1)
    nearest = np.argmin(d2, axis=1)
    return np.sqrt(d2[np.arange(len(x)), nearest]), nearest


def draw_moons(ax, nodes, label=None):
    half = len(nodes) // 2
    for part, lab in ((nodes[:half], label), (nodes[half:], None)):
        ax.plot(part[:, 0], part[:, 1], "r-", lw=0.8, label=lab)


def draw_vectors(ax, x, q, length=0.12):
    """Unsigned direction segments `q` (rows) centred on the points `x`."""
    v = length * q
    ax.quiver(
        x[:, 0] - v[:, 0] / 2,
        x[:, 1] - v[:, 1] / 2,
        v[:, 0],
        v[:, 1],
        angles="xy",
        scale_units="xy",
        scale=1,
        color="darkgreen",
        width=0.003,
        headwidth=0,
        headlength=0,
        headaxislength=0,
    )


def moons_axes(ax, title):
    ax.set(
        xlim=LIMITS[:2],
        ylim=LIMITS[2:],
        aspect="equal",
        xlabel="$x_1$",
        ylabel="$x_2$",
        title=title,
    )
