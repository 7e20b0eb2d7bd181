"""batch_map: chunks of vmap, equal to one vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf


def test_batch_map_equals_vmap_with_partial_chunk():
    field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
    zs = jax.random.normal(jax.random.PRNGKey(2), (37, 2))

    def fn(z):
        return jf.generate_with_jacobian(field, z, rtol=1e-8, atol=1e-8)

    a = jax.jit(lambda zs: jf.batch_map(fn, zs, batch_size=8))(zs)
    b = jax.jit(jax.vmap(fn))(zs)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        jf.batch_map(fn, zs, batch_size=0)


SHARDED = r"""
import os, sys, json
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import jaxflow as jf

assert jax.device_count() == 4, jax.devices()
field = jf.AnalyticField(jf.data.fig3_mixture(jnp.float64), jf.RectifiedFlow())
zs = jax.random.normal(jax.random.PRNGKey(2), (11, 2))
zs = zs.at[5].set(jnp.nan)  # one bad point: its own invalid_input, nobody else's


def fn(z):
    return jf.generate(field, z, rtol=1e-8, atol=1e-8, throw=False)


reference = jax.jit(jax.vmap(fn))(zs)
report = {}


def same(out):
    # chunks of another size may vectorise the arithmetic differently: not bitwise
    close = np.allclose(out.value, reference.value, rtol=1e-12, atol=1e-12, equal_nan=True)
    return [bool(close), bool(np.array_equal(out.result._value, reference.result._value))]


meshes = {
    "flat": jax.make_mesh((4,), ("batch",)),
    "2x2": jax.make_mesh((2, 2), ("a", "b")),
    "two devices": jax.make_mesh((2,), ("b",), devices=jax.devices()[:2]),
}
for name, mesh in meshes.items():
    compiled = jax.jit(lambda zs: jf.batch_map(fn, zs, batch_size=2, mesh=mesh)).lower(zs).compile()
    report[name] = same(compiled(zs))
    # an SPMD program over every device of the mesh, a share each
    text = compiled.as_text()
    report[f"{name} devices"] = [n for n in (1, 2, 4) if f"num_partitions={n}" in text]
report["eager"] = same(jf.batch_map(fn, zs, batch_size=2, mesh=meshes["flat"]))
# the default mesh is every device; 11 points are 3 a device, padded as the one
# device's last chunk of 3 is, so even joint steps see the same chunks
for schedule in (jf.LaneRefill(lanes=3), jf.Chunks(lanes=3), jf.JointSteps(lanes=3)):
    def run(zs, mesh):
        return jf.batch_generate(field, zs, jacobian=True, schedule=schedule, mesh=mesh,
                                 rtol=1e-8, atol=1e-8, throw=False, stats=True)
    one, one_stats = jax.jit(lambda zs: run(zs, None))(zs)
    compiled = jax.jit(lambda zs: run(zs, "auto")).lower(zs).compile()
    out, stats = compiled(zs)
    name = type(schedule).__name__
    report[name] = [
        all(np.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
            for a, b in zip(jax.tree.leaves(out.value), jax.tree.leaves(one.value))),
        bool(np.array_equal(out.result._value, one.result._value)),
        bool(np.array_equal(stats.steps, one_stats.steps)),
        "num_partitions=4" in compiled.as_text(),
    ]
report["bad results"] = int((reference.result._value != 0).sum())
print(json.dumps(report))
"""


@pytest.mark.timeout(150)  # about 5x its idle time on 2 cores
def test_sharded_batch_equals_unsharded(tmp_path):
    """On 4 forced CPU devices (a fresh process: the device count is fixed when
    JAX starts), batch_map over 1-D and 2-D meshes, under jit and eagerly, gives
    the unsharded vmap's values (to 1e-12) and exactly its per-point results, a
    failing point included; and each mesh's devices all take part."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("bad results") == 1
    for name in ("flat", "2x2", "two devices", "eager"):
        assert report[name] == [True, True], name
    assert report["flat devices"] == [4] and report["2x2 devices"] == [4]
    assert report["two devices devices"] == [2]
    for name in ("LaneRefill", "Chunks", "JointSteps"):
        assert report[name] == [True, True, True, True], name


def test_use_cpu_devices_spreads_batches_over_cores():
    """`jf.use_cpu_devices` right after `import jax` makes one device per core
    asked for, and the default `mesh='auto'` of batch_map and batch_generate then
    runs an SPMD program over all of them, with the one-device values."""
    import subprocess
    import sys

    script = (
        "import jax, numpy as np, jaxflow as jf\n"
        "assert jf.use_cpu_devices(3) == 3 and jax.device_count() == 3\n"
        "field = jf.AnalyticField(jf.data.fig3_mixture(), jf.RectifiedFlow())\n"
        "zs = jax.random.normal(jax.random.PRNGKey(0), (8, 2))\n"
        "f = jax.jit(lambda zs: jf.batch_generate(field, zs)).lower(zs).compile()\n"
        "g = jax.jit(lambda zs: jf.batch_map(lambda z: jf.generate(field, z), zs))\n"
        "assert 'num_partitions=3' in f.as_text()\n"
        "one = jax.jit(lambda zs: jf.batch_generate(field, zs, mesh=None))(zs)\n"
        "np.testing.assert_allclose(f(zs), one, rtol=1e-5, atol=1e-5)\n"
        "np.testing.assert_allclose(g(zs), one, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_batch_map_mesh_checks():
    fn = lambda z: 2 * z  # noqa: E731
    zs = jnp.ones((5, 2))
    one = jax.make_mesh((1,), ("batch",))
    np.testing.assert_array_equal(jf.batch_map(fn, zs, mesh=one), 2 * zs)
    # as users run it: without the test suite's jaxtyping hook, which would stop a
    # non-Mesh first
    unchecked = getattr(jf.batch_map, "__wrapped__", jf.batch_map)
    with pytest.raises(ValueError, match="jax.sharding.Mesh"):
        unchecked(fn, zs, mesh="gpu")
    with pytest.raises(ValueError, match="jax.sharding.Mesh"):
        unchecked(fn, zs, mesh=jax.devices())
