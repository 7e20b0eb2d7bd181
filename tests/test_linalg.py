"""The dense decompositions of `jaxflow._linalg`: the values and derivatives of
`jnp.linalg`, and on CPU never a batched LAPACK call (jaxlib 0.10's batched kernels
can deadlock XLA:CPU's thread pool; see the module's docstring), neither in the
helpers nor in the entry points that use them, under a caller's `vmap`."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxflow as jf
from jaxflow import _linalg

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU only")

RNG = np.random.default_rng(0)
A = jnp.asarray(RNG.standard_normal((2, 3, 5, 5)))
SYM = A + jnp.swapaxes(A, -1, -2)
TALL = jnp.asarray(RNG.standard_normal((2, 3, 7, 4)))


def lapack_batch_dims(fn, *args) -> list[int]:
    """`num_batch_dims` of every LAPACK custom call in `fn`'s lowered program."""
    text = jax.jit(fn).lower(*args).as_text()
    calls = [line for line in text.splitlines() if "custom_call @lapack" in line]
    return [int(re.search(r'num_batch_dims = "(\d+)"', line).group(1)) for line in calls]


CASES = [
    ("eigh", _linalg.eigh, lambda a: tuple(jnp.linalg.eigh(a)), SYM),
    ("svd", _linalg.svd, lambda a: tuple(jnp.linalg.svd(a, full_matrices=False)), TALL),
    (
        "singular_values",
        _linalg.singular_values,
        lambda a: jnp.linalg.svd(a, compute_uv=False),
        TALL,
    ),
    ("qr", _linalg.qr, lambda a: tuple(jnp.linalg.qr(a)), TALL),
    ("log_abs_det", _linalg.log_abs_det, lambda a: jnp.linalg.slogdet(a)[1], A),
]


@pytest.mark.parametrize("name, ours, plain, a", CASES, ids=[c[0] for c in CASES])
def test_values_and_derivatives_are_jnp_linalg(name, ours, plain, a):
    # derivatives: a scalar of the outputs whose sign conventions cancel
    def scalar(f):
        def s(m):
            out = f(m)
            leaves = jax.tree_util.tree_leaves(out)
            vals = leaves[1] if name in ("svd",) else leaves[0]
            if name == "qr":
                vals = jnp.abs(jnp.diagonal(leaves[1], axis1=-2, axis2=-1))
            return jnp.sum(jnp.sin(vals))

        return s

    # every value and derivative of one function in one compiled program: eagerly,
    # each operation compiles its own
    @functools.partial(jax.jit, static_argnums=0)
    def everything(f, a):
        # leading axes, a vmap over them, one matrix
        values = [f(a), jax.vmap(jax.vmap(f))(a), f(a[1, 2])]
        derivatives = [jax.grad(scalar(f))(a[0, 1]), jax.jacfwd(scalar(f))(a[0, 1])]
        return values, derivatives, jax.grad(scalar(f))(a)

    (got, got_d, got_g), (want, want_d, want_g) = everything(ours, a), everything(plain, a)
    # the same numbers as jnp.linalg
    for g, w in zip(got, want, strict=True):
        jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-12), g, w)
    for g, w in zip(got_d, want_d, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name, ours, plain, a", CASES, ids=[c[0] for c in CASES])
def test_a_batch_is_a_loop_of_single_calls(name, ours, plain, a):
    # the reference: jnp.linalg batches (so the check below can fail)
    assert max(lapack_batch_dims(jax.vmap(plain), a[0])) >= 1
    assert lapack_batch_dims(jax.vmap(ours), a[0]) == [0] * len(
        lapack_batch_dims(jax.vmap(plain), a[0])
    )
    assert set(lapack_batch_dims(ours, a)) == {0}


def test_entry_points_under_vmap_call_lapack_one_matrix_at_a_time():
    n = 6
    rng = np.random.default_rng(1)
    mat = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n))

    def fn(x):
        return 1.5 * x + 0.3 * jnp.tanh(mat @ x)

    xs = jnp.asarray(rng.standard_normal((3, n)))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    programs = {
        "log_det_slq": lambda x, k: jf.log_det_slq(fn, x, key=k, probes=4, depth=n).value,
        "top_singular_values": lambda x, k: jf.top_singular_values(fn, x, 2, key=k).values,
        "trace_estimate": lambda x, k: (
            jf.trace_estimate(
                lambda v: jax.jvp(fn, (x,), (v,))[1], n, key=k, num_matvecs=6, dtype=x.dtype
            ).value
        ),
        "lyapunov_spectrum_of_map": lambda x, k: (
            jf.lyapunov_spectrum_of_map(lambda y, i: fn(y), x, 4, k=3, key=k).exponents
        ),
        "singular_values": lambda x, k: jf.singular_values(fn, x),
        "log_abs_det_jacobian": lambda x, k: jf.log_abs_det_jacobian(fn, x),
    }
    for name, program in programs.items():
        dims = lapack_batch_dims(jax.vmap(program), xs, keys)
        assert dims and set(dims) == {0}, (name, dims)
