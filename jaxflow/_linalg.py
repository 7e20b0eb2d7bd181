"""Dense decompositions (eigh, svd, qr, slogdet) that cannot hang XLA:CPU.

jaxlib 0.10's CPU LAPACK kernels split a batch of matrices over XLA's intra-op
thread pool and block until the pieces are done (`jax::ParallelBatchMap`). When as
many independent batched decompositions run at once as the pool has threads (two on
a 2-core machine), each holds a thread while waiting for pieces queued behind the
others, and the program stops for good with every thread in a futex wait and no CPU
use. `log_det_slq` vmapped over 200 keys beside two other SLQ runs in one `jit` did
this within two calls on the 2-core CI machine; with the eigendecompositions below
it ran 25 calls in each of two concurrent processes (issue 15's skipped SLQ test).

On CPU, each function here decomposes one matrix at a time: a batch, leading axes or
any `vmap` (ours or a caller's), becomes a loop of unbatched calls
(`jax.custom_batching.sequential_vmap`), which never wait on the pool. The matrices
jaxflow decomposes are small (Ritz and Lanczos matrices, sketches, `n x k` frames)
next to the work around them, so the loop costs little. Other backends keep the
batched call. Derivatives come from JAX's own rules (a `custom_jvp` that calls the
plain decomposition), so a differentiated batch still calls the batched kernel.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _one_matrix_at_a_time(fn: Callable) -> Callable:
    looped = jax.custom_batching.sequential_vmap(fn)

    def loop(a):
        lead = a.shape[:-2]
        if not lead:
            return looped(a)
        out = jax.vmap(looped)(a.reshape((-1,) + a.shape[-2:]))
        return jax.tree_util.tree_map(lambda o: o.reshape(lead + o.shape[1:]), out)

    # sequential_vmap has no derivative rule: JAX's own, through the plain call
    loop = jax.custom_jvp(loop)
    loop.defjvp(lambda primals, tangents: jax.jvp(fn, primals, tangents))

    def decompose(a):
        # a concrete matrix is decomposed eagerly, alone in its program: no deadlock
        if jax.default_backend() != "cpu" or not isinstance(a, jax.core.Tracer):
            return fn(jnp.asarray(a))
        return loop(a)

    return decompose


eigh = _one_matrix_at_a_time(lambda a: tuple(jnp.linalg.eigh(a)))
eigh.__doc__ = "`(eigenvalues, eigenvectors)` of symmetric matrices `(..., n, n)`."
svd = _one_matrix_at_a_time(lambda a: tuple(jnp.linalg.svd(a, full_matrices=False)))
svd.__doc__ = "`(u, s, vh)`, the reduced SVD of matrices `(..., m, n)`."
singular_values = _one_matrix_at_a_time(lambda a: jnp.linalg.svd(a, compute_uv=False))
singular_values.__doc__ = "The singular values of matrices `(..., m, n)`, descending."
qr = _one_matrix_at_a_time(lambda a: tuple(jnp.linalg.qr(a)))
qr.__doc__ = "`(q, r)`, the reduced QR factorisation of matrices `(..., m, n)`."
log_abs_det = _one_matrix_at_a_time(lambda a: jnp.linalg.slogdet(a)[1])
log_abs_det.__doc__ = "`log |det a|` of square matrices `(..., n, n)` (LU)."
