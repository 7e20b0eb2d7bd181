"""A UNet inside loops on XLA:CPU: what the layout and the training loop cost.

Every analysis of a trained image model runs the network inside a loop body (a
diffrax solve, the Lyapunov QR iteration, a DDPM scan), and XLA:CPU compiles
convolutions there differently (jax-ml/jax#12868). Two workloads on 8x8 digits,
batch 256:

1. the PF-ODE map of `examples/digits_reconstruction.py`: 40 Euler steps of a
   UNet field inside one `lax.fori_loop`, for `jf.nn.UNet` (channel-last inside)
   against the same layers written with Equinox's channel-first `eqx.nn.Conv2d`
   (what a researcher writes first), and against the same steps dispatched
   from Python;
2. training steps (loss, gradient, Adam) of the same UNet, as `jf.train` runs
   them (one compiled step per call) against a `lax.scan` over steps.

    python benchmarks/unet_loops.py [--repeats 3]
"""

import argparse
import json
import os
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import jaxflow as jf


class ChannelFirstConv(eqx.Module):
    """`jf.nn.UNet`'s channel-last convolution rewritten with `eqx.nn.Conv2d` on a
    transposed image: the same numbers, channel-first inside."""

    conv: eqx.nn.Conv2d

    def __init__(self, layer):
        kh, kw, c_in, c_out = layer.weight.shape
        conv = eqx.nn.Conv2d(
            c_in, c_out, kh, stride=layer.stride, padding=layer.padding, key=jax.random.PRNGKey(0)
        )
        self.conv = eqx.tree_at(
            lambda c: (c.weight, c.bias),
            conv,
            (jnp.transpose(layer.weight, (3, 2, 0, 1)), layer.bias[:, None, None]),
        )

    def __call__(self, x):
        return jnp.transpose(self.conv(jnp.transpose(x, (2, 0, 1))), (1, 2, 0))


def channel_first(unet):
    """The same UNet with every convolution channel-first."""
    return jax.tree.map(
        lambda m: ChannelFirstConv(m) if isinstance(m, jf.nn.Conv) else m,
        unet,
        is_leaf=lambda m: isinstance(m, jf.nn.Conv),
    )


def timed(f, *args, repeats):
    jax.block_until_ready(f(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="out")
    args = p.parse_args(argv)
    data, _ = jf.data.digits(8)
    x = jnp.asarray(data[:256])
    path = jf.OrnsteinUhlenbeck(5.0)
    unet = jf.nn.UNet((1, 8, 8), 16, (1, 2), 1, key=jax.random.PRNGKey(0))
    twin = channel_first(unet)
    one = jax.random.normal(jax.random.PRNGKey(1), (64,))
    assert jnp.allclose(unet(one, 0.3), twin(one, 0.3), atol=1e-5), "the twin must agree"
    times = jnp.geomspace(1e-3, 5.0, args.steps + 1)

    def euler(net):
        field = jf.LearnedField(net, path, "noise")

        def step(i, y):
            v = jax.vmap(field.velocity_unchecked, in_axes=(0, None))(y, times[i])
            return y + (times[i + 1] - times[i]) * v

        return step

    rows = {}
    for name, net in (("jf.nn.UNet (channel-last)", unet), ("eqx.nn.Conv2d (channel-first)", twin)):
        step = euler(net)
        looped = jax.jit(lambda y, step=step: jax.lax.fori_loop(0, args.steps, step, y))
        one_step = jax.jit(step)

        def python_loop(y, one_step=one_step):
            for i in range(args.steps):
                y = one_step(i, y)
            return y

        rows[name] = dict(
            fori_loop_s=timed(looped, x, repeats=args.repeats),
            python_loop_s=timed(python_loop, x, repeats=args.repeats),
        )
        print(
            f"PF-ODE, {args.steps} Euler steps x 256 images, {name}: fori_loop "
            f"{rows[name]['fori_loop_s']:.3f} s, steps dispatched from Python "
            f"{rows[name]['python_loop_s']:.3f} s",
            flush=True,
        )
    a, b = rows["jf.nn.UNet (channel-last)"], rows["eqx.nn.Conv2d (channel-first)"]
    print(f"  channel-last speed-up inside the loop: {b['fori_loop_s'] / a['fori_loop_s']:.1f}x")

    opt = optax.adam(1e-3)
    params, static = eqx.partition(unet, eqx.is_array)

    def body(state, i):
        params, opt_state = state
        k = jax.random.fold_in(jax.random.PRNGKey(2), i)
        kb, kl = jax.random.split(k)
        batch = x[jax.random.randint(kb, (128,), 0, x.shape[0])]

        def loss(p):
            return jf.denoising_score_matching_loss(eqx.combine(p, static), path, batch, kl)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    n_train = 20
    state = (params, opt.init(params))
    scanned = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(n_train)))
    stepped = jax.jit(body)

    def per_step(s):
        for i in range(n_train):
            s, _ = stepped(s, i)
        return s

    train = dict(
        scan_s_per_step=timed(scanned, state, repeats=args.repeats) / n_train,
        per_call_s_per_step=timed(per_step, state, repeats=args.repeats) / n_train,
    )
    print(
        f"training step (batch 128): lax.scan {train['scan_s_per_step'] * 1e3:.0f} ms, one "
        f"compiled step per call (jf.train) {train['per_call_s_per_step'] * 1e3:.0f} ms: "
        f"{train['scan_s_per_step'] / train['per_call_s_per_step']:.1f}x",
        flush=True,
    )
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "unet_loops.json")
    with open(out, "w") as f:
        json.dump(
            dict(
                pf_ode=rows,
                training=train,
                steps=args.steps,
                jax=jax.__version__,
                cpu_count=os.cpu_count(),
                machine=platform.machine(),
                backend=jax.default_backend(),
            ),
            f,
            indent=1,
        )
    print("wrote", out)


if __name__ == "__main__":
    main()
