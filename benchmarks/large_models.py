"""SD3.5 Medium, SD3.5 Large and FLUX.1-dev: jaxflow's JAX ports against diffusers.

The released architectures (their public `config.json`, hard-coded below) with
random weights, since no checkpoint can be downloaded here. For each model,
image size (512^2, 1024^2) and dtype (bfloat16, float32), on one device:

- jaxflow: the field `model.field(...)` returns (`jf.LearnedField` on
  `jfd.SD3Velocity` / `jfd.FluxVelocity`) at sigma = 0.5 with one prompt's
  embeddings (SD3: 333 tokens = 77 CLIP + 256 T5; FLUX: 512 T5 tokens, guidance
  3.5): compile time (lower + compile) and run time of one velocity evaluation
  (`field.velocity(x, t)`) and of one JVP in x (`jax.jvp` with a random tangent);
  the field is an argument of `eqx.filter_jit`, never closed over;
- diffusers (PyTorch, eager): the transformer's forward with its default
  attention (flash / memory-efficient SDPA on a GPU: what a researcher gets),
  the forward with the math SDPA kernel, and `torch.func.jvp` under the math
  kernel (the fused kernels have no forward-mode rule), "n/a (reason)" when it
  fails or runs out of memory;
- peak memory: on a GPU the device allocator's peak (JAX's
  `memory_stats()["peak_bytes_in_use"]`, torch's `max_memory_allocated()`),
  weights included; on a CPU the process's peak RSS (process-wide: weights,
  both frameworks' runtimes and every earlier case of that process);
- accuracy: max |jaxflow - diffusers| / max |diffusers| of the velocity (against
  diffusers' default-attention forward) and of the JVP's tangent (against
  `torch.func.jvp`); float32 with `jax.default_matmul_precision("highest")` and
  torch's TF32 off (timings too), bfloat16 as is.

Run times are medians of `--repeats` calls after one warm-up call, synchronised
(`block_until_ready`, `torch.cuda.synchronize`).

Memory plan. The cases run in fresh subprocesses with a timeout (which also
isolates an out-of-memory failure or a crash), diffusers first, then jaxflow,
never both models on the device at once while timing. The torch worker builds the model on
the `meta` device in the dtype, allocates it on the device (`to_empty`) and draws
every weight there from a seeded generator; it records its outputs to a scratch
folder and exits. The jaxflow worker draws the same weights the same way, feeds
them to `from_diffusers` one tensor at a time (each copied to the host when the
port reads it and its device copy freed then), deletes the torch model, empties
torch's cache, and only then compiles and times. Host memory peaks at about twice
the model in the dtype (the port's per-block arrays and their stacked copy), the
device at about one model plus the activations. JAX runs with
`XLA_PYTHON_CLIENT_PREALLOCATE=false` (and a 0.92 memory fraction), since torch
shares the device.

JAX's peak cannot be reset, so peaks are per process. By default a process runs
the sizes of one (model, dtype, framework) in increasing order and reads the peak
after each, every buffer of the smaller size freed first, which gives each
size's peak (a larger size's forward peak is at least the smaller size's JVP
peak, which on these models it exceeds) while building each model once per framework and dtype (the
conversion of a 12B-parameter model is most of a case's time on a GPU).
`--isolation size` runs one process per (model, size, dtype, framework) instead
(`model` and `framework`, fewer processes, let a peak include the earlier dtypes
and models of its process: for the CPU check);
`--budget` bounds the whole run (a worker's timeout shrinks to what is left, and
cases not started are recorded as skipped). The JSON (`--out`) is rewritten after
every worker, so a run cut short keeps what it measured.

    python benchmarks/large_models.py                  # the real models, needs a GPU
    python benchmarks/large_models.py --models flux-dev --sizes 1024 --dtypes bfloat16
    python benchmarks/large_models.py --tiny           # tiny configs on the CPU

On a lent GPU machine run `benchmarks/gpu_run.sh` (one prepared script).

`--study`: the cost per image of the large-model study
(examples/large_model_reconstruction.py; default SD3.5 Medium, bfloat16, 512^2
and 1024^2), batch 1, on the same random-weight models, inputs (the latent as the
image's latents, the tangent normalised as the direction u, one prompt's
embeddings, one transformer pass a velocity) and worker processes, each route
with S Euler steps each way (`--study-steps`, default 4) on the pipeline's grid
(SD3.5: shift 3.0):

- jaxflow, each stage compiled apart (compile time recorded apart), as the
  example's `make_study` computes it, the field an argument of `eqx.filter_jit`:
  (a) invert + regenerate (`jf.invert`, `jf.generate`, `solver="euler",
  times=grid`), (b) the exact JVP through the whole generation solve
  (`jf.intrinsic_instability`), (c) the finite-difference perturbed regenerate,
  (d) the top-k (`--top-k`, default 4) Lyapunov exponents of the step map
  (`jf.lyapunov_spectrum_of_map`);
- the paper's route in PyTorch: the diffusers transformer in the pipeline's Euler
  loop (`FlowMatchEulerDiscreteScheduler.step`), eager, under `torch.no_grad()`:
  invert + regenerate, and the perturbed regenerate of the finite difference;
- per image: jaxflow's exact route (a + b) against the paper's route (invert +
  regenerate + FD regenerate), their ratio (goal <= 1.5), the top-k as an extra,
  jaxflow's whole study (a + b + c + d), and the 100-image, 500-step estimate in
  hours of each. The estimate extrapolates the per-step cost: linearly from one
  S (ms / S a step), or from several (`--study-steps 2,4`) by the least-squares
  line a + b S, which separates a solve's fixed cost from its per-step cost
  (jaxflow's solves evaluate the field once more, at the start, to tell a
  non-finite field from a failed solve: S + 1 evaluations for S steps, a fixed
  cost that the linear extrapolation from a small S scales by 500 / S, so it
  overstates jaxflow's cost); the ratio is reported at S and at 500 steps;
- checks: jaxflow's inversion and regeneration against the torch route's
  (max relative difference: float32 agrees to rounding), E_jvp against both
  routes' finite-difference E_fd (`|n| = fd_eps |zhat|`, fd_eps 1e-3 in float32,
  1e-2 in bfloat16, where 1e-3 rounds away).

    python benchmarks/large_models.py --study --sizes 512,1024 --dtypes bfloat16
    python benchmarks/large_models.py --tiny --study   # tiny-sd3, 128 px, float32, CPU

`--tiny` runs the same code on `jfd.transformer_config("tiny-sd3")` (as
`sd35-medium`) and `"tiny-flux"` (as `flux-dev`) at 128 and 256 px, float32 and
bfloat16, on the CPU, one process per framework, one thread each (on a small
shared machine torch's oversubscribed thread pool made tiny matmuls 100x
slower); `--models sd35-large` adds SD3.5 Large's tiny twin (no dual attention).
A functional check, not a performance measurement: XLA:CPU compile time
dominates it.
"""

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from jaxflow.diffusers import transformer_config

# ---------------------------------------------------------------------------- configs


def _config(name: str, **changes) -> dict:
    config = {k: v for k, v in transformer_config(name).items() if not k.startswith("_")}
    return {**config, **changes}


# name -> (family, config, text tokens, tiny config, tiny text tokens)
MODELS = {
    "sd35-medium": ("sd3", _config("sd3.5-medium"), 77 + 256, _config("tiny-sd3"), 24),
    "sd35-large": (
        "sd3",
        _config("sd3.5-large"),
        77 + 256,
        # SD3.5 Large's tiny twin has no dual-attention layer, as Large
        _config("tiny-sd3", dual_attention_layers=()),
        24,
    ),
    "flux-dev": ("flux", _config("flux.1-dev"), 512, _config("tiny-flux"), 16),
}
TINY_DEFAULT = ("sd35-medium", "flux-dev")  # tiny-sd3 and tiny-flux
LATENT_CHANNELS = 16  # SD3's and FLUX's VAEs
VAE_FACTOR = 8
SIGMA = 0.5
GUIDANCE = 3.5  # FLUX.1-dev's pipeline default
SEED = 0
RESULT = "@@large_models "


def _model_setup(name: str, tiny: bool):
    family, config, length, tiny_config, tiny_length = MODELS[name]
    return family, dict(tiny_config if tiny else config), tiny_length if tiny else length


# ---------------------------------------------------------------------------- inputs


def _inputs(family: str, config: dict, length: int, size: int) -> dict:
    """The latent (c, h, w), its tangent and the prompt embeddings, float32 NumPy,
    the same in both workers."""
    rng = np.random.default_rng([SEED, size, length])
    h = w = size // VAE_FACTOR
    return dict(
        latent=rng.standard_normal((LATENT_CHANNELS, h, w)).astype(np.float32),
        tangent=rng.standard_normal((LATENT_CHANNELS, h, w)).astype(np.float32),
        context=rng.standard_normal((length, config["joint_attention_dim"])).astype(np.float32),
        pooled=rng.standard_normal((config["pooled_projection_dim"],)).astype(np.float32),
    )


def _pack(latent: np.ndarray) -> np.ndarray:
    """FluxPipeline._pack_latents for one latent (c, h, w) -> (h/2 w/2, 4c)."""
    c, h, w = latent.shape
    x = latent.reshape(c, h // 2, 2, w // 2, 2).transpose(1, 3, 0, 2, 4)
    return x.reshape((h // 2) * (w // 2), 4 * c)


def _unpack(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """FluxPipeline._unpack_latents for one latent: (h/2 w/2, 4c) -> (c, h, w)."""
    c = tokens.shape[1] // 4
    return tokens.reshape(h // 2, w // 2, c, 2, 2).transpose(2, 0, 3, 1, 4).reshape(c, h, w)


def _image_ids(h: int, w: int) -> np.ndarray:
    """FluxPipeline._prepare_latent_image_ids: [0, row, column] of the 2x2 patches."""
    ids = np.zeros((h // 2, w // 2, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------- torch side


def _torch_model(family: str, config: dict, dtype_name: str, device: str):
    """The diffusers transformer with random weights, built on `device` in the dtype
    without a float32 or host copy: created on `meta`, allocated by `to_empty`, every
    parameter drawn in place from one seeded generator on the device (so both
    workers draw the same weights), the SD3 position table recomputed as diffusers
    does. Weights `N(0, 1/fan_in)`, norm weights `1 + 0.1 N(0, 1)`, biases
    `0.1 N(0, 1)` (diffusers zero-initialises the adaLN and output layers, which
    would make the comparison one of zeros)."""
    import torch

    if family == "sd3":
        from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel as cls
    else:
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel as cls
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = cls(**config)
    model = model.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, float(np.prod(p.shape[1:])) ** -0.5, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.1, generator=gen)
        for name, buffer in model.named_buffers():
            if name != "pos_embed.pos_embed":
                raise RuntimeError(f"no rule to initialise the buffer {name!r} after to_empty")
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            pe = model.pos_embed
            table = get_2d_sincos_pos_embed(
                buffer.shape[-1],
                pe.pos_embed_max_size,
                base_size=pe.base_size,
                interpolation_scale=pe.interpolation_scale,
                output_type="pt",
            )
            buffer.copy_(table.float().unsqueeze(0).to(buffer.dtype))
    return model


def _torch_kwargs(family: str, inp: dict, size: int, dtype, device: str):
    """diffusers' forward inputs (batch 1) and the latent as the model takes it."""
    import torch

    def t(a, dt=dtype):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    h = w = size // VAE_FACTOR
    kw = dict(
        encoder_hidden_states=t(inp["context"][None]),
        pooled_projections=t(inp["pooled"][None]),
        return_dict=False,
    )
    if family == "sd3":
        # the SD3 pipeline's timestep: 1000 sigma
        kw["timestep"] = t(np.array([1000.0 * SIGMA], np.float32), torch.float32)
        return kw, t(inp["latent"][None]), t(inp["tangent"][None])
    kw["timestep"] = t(np.array([SIGMA], np.float32), torch.float32)
    kw["guidance"] = t(np.array([GUIDANCE], np.float32), torch.float32)
    kw["img_ids"] = t(_image_ids(h, w), torch.float32)
    kw["txt_ids"] = t(np.zeros((inp["context"].shape[0], 3), np.float32), torch.float32)
    return kw, t(_pack(inp["latent"])[None]), t(_pack(inp["tangent"])[None])


def _torch_flat(family: str, out, size: int) -> np.ndarray:
    a = out.detach().float().cpu().numpy()[0]
    if family == "flux":
        a = _unpack(a, size // VAE_FACTOR, size // VAE_FACTOR)
    return a.reshape(-1)


def _failure(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    if "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text:
        return "n/a (OOM)"
    return f"n/a ({text[:200]})"


class _Memory:
    """Peak memory: the device allocator's (resettable for torch), or the process's
    peak RSS on a CPU."""

    def __init__(self, framework: str, device):
        self.framework, self.device = framework, device

    @property
    def kind(self) -> str:
        return "process peak RSS" if self._cpu else "device peak"

    @property
    def _cpu(self) -> bool:
        if self.framework == "torch":
            return self.device == "cpu"
        return self.device.platform == "cpu"

    def reset(self):
        if self.framework == "torch" and not self._cpu:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        if self._cpu:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        if self.framework == "torch":
            import torch

            return torch.cuda.max_memory_allocated() / 1e9
        return self.device.memory_stats()["peak_bytes_in_use"] / 1e9

    def in_use_gb(self) -> float | None:
        if self._cpu:
            return None
        if self.framework == "torch":
            import torch

            return torch.cuda.memory_allocated() / 1e9
        return self.device.memory_stats()["bytes_in_use"] / 1e9


def _timed(call, sync, repeats: int):
    """(first call s, median of `repeats` later calls in ms, last output)."""
    start = time.perf_counter()
    out = sync(call())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        del out
        start = time.perf_counter()
        out = sync(call())
        times.append(time.perf_counter() - start)
    return first, 1e3 * statistics.median(times), out


def _torch_setup(spec: dict):
    """`(device, memory, sync, base record)` of a diffusers worker process."""
    import torch

    device = "cpu" if spec["tiny"] or not torch.cuda.is_available() else "cuda"
    # float32 is float32: no TF32 matmuls or convolutions (diffusers' default too)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    memory = _Memory("torch", device)

    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    base = dict(
        framework="diffusers",
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})",
        memory_kind=memory.kind,
        torch=torch.__version__,
        diffusers=importlib.metadata.version("diffusers"),
    )
    return device, memory, sync, base


def _torch_worker(spec: dict, emit) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, memory, sync, base = _torch_setup(spec)
    for name, dtype_name, sizes in spec["cases"]:
        family, config, length = _model_setup(name, spec["tiny"])
        dtype = getattr(torch, dtype_name)
        try:
            start = time.perf_counter()
            model = sync(_torch_model(family, config, dtype_name, device))
            build_s = time.perf_counter() - start
            n_params = sum(p.numel() for p in model.parameters())
        except Exception as e:  # recorded, e.g. an OOM
            for size in sizes:
                emit(dict(base, model=name, size=size, dtype=dtype_name, error=_failure(e)))
            continue
        for size in sizes:
            rec = dict(
                base,
                model=name,
                size=size,
                dtype=dtype_name,
                params=n_params,
                build_s=build_s,
            )
            inp = _inputs(family, config, length, size)
            kw, x, dx = _torch_kwargs(family, inp, size, dtype, device)
            ref = {}

            def forward(kw=kw, x=x, model=model):
                with torch.no_grad():
                    return model(hidden_states=x, **kw)[0]

            def jvp(kw=kw, x=x, dx=dx, model=model):
                def f(hidden_states):
                    return model(hidden_states=hidden_states, **kw)[0]

                with torch.no_grad():
                    return torch.func.jvp(f, (x,), (dx,))

            for key, backend, call in (
                ("forward", None, forward),
                ("forward_math", SDPBackend.MATH, forward),
                ("jvp", SDPBackend.MATH, jvp),
            ):
                memory.reset()
                try:
                    with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                        first, ms, out = _timed(call, sync, spec["repeats"])
                    rec[f"{key}_first_call_s"] = first
                    rec[f"{key}_ms"] = ms
                    rec[f"{key}_peak_gb"] = memory.peak_gb()
                    if key == "forward":
                        ref["forward"] = _torch_flat(family, out, size)
                    elif key == "jvp":
                        ref["jvp"] = _torch_flat(family, out[1], size)
                        ref["jvp_primal"] = _torch_flat(family, out[0], size)
                    del out
                except Exception as e:  # recorded: OOM, no forward-AD rule, ...
                    rec[f"{key}_error"] = _failure(e)
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            if "jvp_ms" in rec and "forward_math_ms" in rec:
                rec["jvp_over_forward_math"] = rec["jvp_ms"] / rec["forward_math_ms"]
            primal = ref.pop("jvp_primal", None)
            if primal is not None and "forward" in ref:
                # the JVP's primal is the math kernel's forward: a check on torch itself
                rec["jvp_primal_vs_forward"] = _rel(primal, ref["forward"])
            np.savez(_ref_file(spec, name, size, dtype_name), **ref)
            emit(rec)
            del kw, x, dx, forward, jvp
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- JAX side


class _LazyTensor:
    """One torch tensor, copied to the host only when the port reads it
    (`np.asarray` calls `__array__`), its device copy released then."""

    def __init__(self, tensors: dict, name: str, on_release):
        self.tensors, self.name, self.on_release = tensors, name, on_release

    def __array__(self, dtype=None, copy=None):
        from jaxflow.diffusers._torch import to_numpy

        tensor = self.tensors.pop(self.name)
        out = to_numpy(tensor)
        self.on_release(tensor.numel() * tensor.element_size())
        del tensor
        return out if dtype is None else out.astype(dtype)


def _port(family: str, config: dict, dtype_name: str, device: str):
    """The jaxflow port of the seeded diffusers model, converted tensor by tensor."""
    import jax.numpy as jnp
    import torch

    import jaxflow.nn as jnn

    model = _torch_model(family, config, dtype_name, device)
    n_params = sum(p.numel() for p in model.parameters())
    diffusers_config = dict(model.config)
    tensors = dict(model.state_dict())
    del model
    released = [0]

    def on_release(nbytes):
        # give freed weights back to the driver every ~2 GB, for JAX's allocator
        released[0] += nbytes
        if device == "cuda" and released[0] > 2e9:
            released[0] = 0
            torch.cuda.empty_cache()

    lazy = {name: _LazyTensor(tensors, name, on_release) for name in list(tensors)}
    cls = jnn.SD3Transformer if family == "sd3" else jnn.FluxTransformer
    port = cls.from_diffusers(diffusers_config, lazy, dtype=getattr(jnp, dtype_name))
    del lazy, tensors
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return port, n_params


def _field(family: str, port, inp: dict, size: int):
    """What `model.field(prompt_embeds=..., pooled_prompt_embeds=..., height=size,
    width=size, guidance_scale=1)` returns for SD3 (one transformer pass per
    evaluation, no CFG), and for FLUX with its distilled guidance 3.5."""
    import jax.numpy as jnp

    import jaxflow as jf
    import jaxflow.diffusers as jfd
    import jaxflow.nn as jnn

    h = w = size // VAE_FACTOR
    shape = (LATENT_CHANNELS, h, w)
    context, pooled = jnp.asarray(inp["context"]), jnp.asarray(inp["pooled"])
    if family == "sd3":
        network = jfd.SD3Velocity(port, context, pooled, shape)
    else:
        rope = port.rope(jnn.flux_image_ids(h, w), np.zeros((context.shape[0], 3)))
        network = jfd.FluxVelocity(
            port, context, pooled, rope, shape, jnp.asarray(GUIDANCE, jnp.float32)
        )
    return jf.LearnedField(network, jf.RectifiedFlow(), "velocity")


def _velocity(field, x, t):
    return field.velocity(x, t)


def _velocity_jvp(field, x, t, dx):
    import jax

    return jax.jvp(lambda y: field.velocity(y, t), (x,), (dx,))


def _jax_worker(spec: dict, emit) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import torch

    device = "cpu" if spec["tiny"] or not torch.cuda.is_available() else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    jax_device = jax.devices()[0]
    memory = _Memory("jax", jax_device)
    forward_jit = eqx.filter_jit(_velocity)
    jvp_jit = eqx.filter_jit(_velocity_jvp)
    base = dict(
        framework="jaxflow",
        device=(
            f"cpu ({platform.machine()})"
            if jax_device.platform == "cpu"
            else str(jax_device.device_kind)
        ),
        memory_kind=memory.kind,
        jax=jax.__version__,
        equinox=importlib.metadata.version("equinox"),
    )

    def sync(x):
        return jax.block_until_ready(x)

    for name, dtype_name, sizes in spec["cases"]:
        family, config, length = _model_setup(name, spec["tiny"])
        dtype = getattr(jnp, dtype_name)
        try:
            start = time.perf_counter()
            port, n_params = _port(family, config, dtype_name, device)
            port = sync(port)
            build_s = time.perf_counter() - start
            weights_gb = memory.in_use_gb()
        except Exception as e:  # recorded, e.g. an OOM
            for size in sizes:
                emit(dict(base, model=name, size=size, dtype=dtype_name, error=_failure(e)))
            continue
        for size in sizes:
            rec = dict(
                base,
                model=name,
                size=size,
                dtype=dtype_name,
                params=n_params,
                build_s=build_s,
                weights_gb=weights_gb,
            )
            inp = _inputs(family, config, length, size)
            field = _field(family, port, inp, size)
            x = jnp.asarray(inp["latent"].reshape(-1), dtype)
            dx = jnp.asarray(inp["tangent"].reshape(-1), dtype)
            t = jnp.asarray(SIGMA, jnp.float32)
            ref_file = _ref_file(spec, name, size, dtype_name)
            ref = dict(np.load(ref_file)) if ref_file.exists() else {}
            # float32 matmuls in float32 (not TF32) on a GPU, as torch with TF32 off
            precision = "highest" if dtype_name == "float32" else None
            for key, jitted, args in (
                ("forward", forward_jit, (field, x, t)),
                ("jvp", jvp_jit, (field, x, t, dx)),
            ):
                try:
                    with jax.default_matmul_precision(precision):
                        start = time.perf_counter()
                        compiled = jitted.lower(*args).compile()
                        rec[f"{key}_compile_s"] = time.perf_counter() - start
                        first, ms, out = _timed(
                            lambda c=compiled, a=args: c(*a), sync, spec["repeats"]
                        )
                    rec[f"{key}_first_call_s"] = first
                    rec[f"{key}_ms"] = ms
                    rec[f"{key}_peak_gb"] = memory.peak_gb()
                    value = out[1] if key == "jvp" else out
                    if key in ref:
                        rec[f"{key}_max_rel_diff"] = _rel(np.asarray(value, np.float32), ref[key])
                    if key == "jvp" and "forward" in ref:
                        rec["jvp_primal_max_rel_diff"] = _rel(
                            np.asarray(out[0], np.float32), ref["forward"]
                        )
                    del out, value, compiled
                except Exception as e:  # recorded: OOM, ...
                    rec[f"{key}_error"] = _failure(e)
                gc.collect()
            if "forward_ms" in rec and "jvp_ms" in rec:
                rec["jvp_over_forward"] = rec["jvp_ms"] / rec["forward_ms"]
            emit(rec)
            del field, x, dx
            gc.collect()
        del port
        gc.collect()


def _ref_file(spec: dict, model: str, size: int, dtype_name: str) -> pathlib.Path:
    return pathlib.Path(spec["workdir"]) / f"ref_{model}_{size}_{dtype_name}.npz"


# ---------------------------------------------------------------------------- study
#
# `--study`: the cost of one image of the large-model study
# (examples/large_model_reconstruction.py, `make_study`) on the same random-weight
# models and inputs: the latent `inp["latent"]` stands for an image's VAE latents,
# `inp["tangent"]` normalised is the direction u, one prompt's embeddings (the
# null-prompt study runs at guidance 1, one transformer pass a velocity; FLUX keeps
# its distilled guidance, also one pass). Each route runs S Euler steps each way on
# the pipeline's grid for S steps, for each S of `--study-steps`; the per-image
# costs are extrapolated to the paper's 500 steps (`_extrapolate`) and 100 images.

STUDY_STEPS = 500  # the paper's steps each way (appendix E.2)
STUDY_IMAGES = 100
STUDY_TOP_K = 4
STUDY_GOAL = 1.5  # issue 14: the exact route at most 1.5x the paper's route
# |n| / |zhat| of the finite difference: the example's default in float32; in
# bfloat16 1e-3 is below the latent's resolution (8 bits of mantissa) and the
# perturbation would round away, so 1e-2 there (docs/large_model_study.md)
STUDY_FD_EPS = {"float32": 1e-3, "bfloat16": 1e-2}
# the stages timed: jaxflow all four, torch (the paper's route) the two solves
JAX_STAGES = ("invert_regenerate", "jvp", "fd_regenerate", "topk")
TORCH_STAGES = ("invert_regenerate", "fd_regenerate")
# the routes per image, as sums of stages
ROUTES = {
    "jaxflow_exact_route": ("jaxflow", ("invert_regenerate", "jvp")),
    "jaxflow_topk": ("jaxflow", ("topk",)),
    "jaxflow_whole_study": ("jaxflow", JAX_STAGES),
    "torch_paper_route": ("diffusers", TORCH_STAGES),
}


def _study_sigmas(family: str, size: int, steps: int) -> np.ndarray:
    """The pipeline's sigmas for `steps` steps (decreasing, ending at 0, float32),
    from diffusers' own scheduler with the released pipelines' settings, as each
    pipeline's `__call__` sets it (a transformer alone carries none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        scheduler.set_timesteps(steps)
    else:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        seq_len = (size // VAE_FACTOR // 2) ** 2
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.numpy().astype(np.float32)


def _direction(inp: dict) -> np.ndarray:
    u = inp["tangent"].reshape(-1).astype(np.float64)
    return (u / np.linalg.norm(u)).astype(np.float32)


def _study_ref_file(spec: dict, model: str, size: int, dtype_name: str, steps: int):
    return pathlib.Path(spec["workdir"]) / f"study_{model}_{size}_{dtype_name}_{steps}.npz"


def _stage(part: dict, key: str, call, sync, repeats: int, memory: "_Memory"):
    """Times `call` into `part` (first call s, median ms, peak GB); its output, or
    None with `part[key + "_error"]` when it failed."""
    memory.reset()
    try:
        first, ms, out = _timed(call, sync, repeats)
    except Exception as e:  # recorded: OOM, ...
        part[f"{key}_error"] = _failure(e)
        return None
    part[f"{key}_first_call_s"] = first
    part[f"{key}_ms"] = ms
    part[f"{key}_peak_gb"] = memory.peak_gb()
    return out


def _study_record(base: dict, name: str, size: int, dtype_name: str, parts: dict) -> dict:
    """One case's record: every step count's timings under `by_steps`, and the
    largest step count's timings and checks at the top level."""
    rec = dict(base, model=name, size=size, dtype=dtype_name, steps=sorted(parts))
    rec["fd_eps"] = STUDY_FD_EPS[dtype_name]
    rec["by_steps"] = {
        str(steps): {k: v for k, v in part.items() if k.endswith(("_ms", "_compile_s", "_error"))}
        for steps, part in sorted(parts.items())
    }
    rec.update(parts[max(parts)])
    return rec


def _torch_study_run(model, family, kw, x, u, dtype, sigmas, fd_eps, timing) -> tuple:
    """The paper's route at one step count: (timings and E_fd, outputs to compare)."""
    import torch

    sync, repeats, memory, device, size = timing
    steps = len(sigmas) - 1
    # the pipeline's timestep, in float32 as the scheduler makes it: 1000 sigma
    # (FLUX's pipeline passes it divided by 1000 again)
    timesteps = sigmas * np.float32(1000)
    if family == "flux":
        timesteps = timesteps / np.float32(1000)
    timesteps = [torch.tensor([t], dtype=torch.float32, device=device) for t in timesteps]
    grid = [torch.tensor(s, dtype=torch.float32, device=device) for s in sigmas]

    def euler(y, order):
        # FlowMatchEulerDiscreteScheduler.step: the update in float32, the latent
        # cast back to the model output's dtype
        for i, j in zip(order[:-1], order[1:], strict=True):
            v = model(hidden_states=y, **dict(kw, timestep=timesteps[i]))[0]
            y = (y.float() + (grid[j] - grid[i]) * v.float()).to(v.dtype)
        return y

    down = list(range(steps + 1))  # generation: sigma_0 = 1 ... sigma_S = 0
    up = down[::-1]  # inversion: the same grid from 0

    def invert_regenerate():
        with torch.no_grad():
            zhat = euler(x, up)
            return zhat, euler(zhat, down)

    part, ref = {}, {}
    out = _stage(part, "invert_regenerate", invert_regenerate, sync, repeats, memory)
    if out is None:
        part["fd_regenerate_error"] = "n/a (no inversion)"
        return part, ref
    zhat, xhat = out
    ref["zhat"] = _torch_flat(family, zhat, size)
    ref["xhat"] = _torch_flat(family, xhat, size)
    # n = fd_eps |zhat| u as applied: after the cast to the model's dtype
    start = (zhat.float() + fd_eps * torch.linalg.vector_norm(zhat.float()) * u).to(dtype)
    n_norm = torch.linalg.vector_norm(start.float() - zhat.float())

    def fd_regenerate():
        with torch.no_grad():
            return euler(start, down)

    perturbed = _stage(part, "fd_regenerate", fd_regenerate, sync, repeats, memory)
    if perturbed is not None:
        part["E_fd"] = float(torch.linalg.vector_norm(perturbed.float() - xhat.float()) / n_norm)
        ref["E_fd"] = np.float64(part["E_fd"])
    return part, ref


def _torch_study_worker(spec: dict, emit) -> None:
    """The paper's route: the diffusers transformer, eager, in the pipeline's Euler
    loop under `torch.no_grad()`: invert, regenerate, and the perturbed regenerate
    of the finite difference."""
    import torch

    device, memory, sync, base = _torch_setup(spec)
    base["mode"] = "study"
    for name, dtype_name, sizes in spec["cases"]:
        family, config, length = _model_setup(name, spec["tiny"])
        dtype = getattr(torch, dtype_name)
        try:
            start = time.perf_counter()
            model = sync(_torch_model(family, config, dtype_name, device))
            build_s = time.perf_counter() - start
        except Exception as e:  # recorded, e.g. an OOM
            for size in sizes:
                emit(dict(base, model=name, size=size, dtype=dtype_name, error=_failure(e)))
            continue
        for size in sizes:
            inp = _inputs(family, config, length, size)
            kw, x, _ = _torch_kwargs(family, inp, size, dtype, device)
            u = _direction(inp).reshape(inp["latent"].shape)
            u = torch.from_numpy(_pack(u)[None] if family == "flux" else u[None]).to(device)
            timing = (sync, spec["repeats"], memory, device, size)
            parts = {}
            for steps in spec["study"]["steps"]:
                sigmas = _study_sigmas(family, size, steps)
                parts[steps], ref = _torch_study_run(
                    model, family, kw, x, u, dtype, sigmas, STUDY_FD_EPS[dtype_name], timing
                )
                np.savez(_study_ref_file(spec, name, size, dtype_name, steps), **ref)
                del ref
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            emit(_study_record(dict(base, build_s=build_s), name, size, dtype_name, parts))
            del kw, x, u
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _study_functions(times, top_k: int, fd_eps: float) -> dict:
    """The stages of `make_study` (examples/large_model_reconstruction.py, Euler)
    for one image, each compiled apart so that each is timed apart; the field is
    an argument (closed over, its weights would become constants), the grid and
    the settings are closed over (`jf.generate` needs a concrete grid)."""
    import equinox as eqx
    import jax.numpy as jnp

    import jaxflow as jf

    sigmas = times[::-1]  # generation walks the grid from the noise end
    steps = int(times.shape[0]) - 1
    kw = dict(solver="euler", times=times, throw=False)

    def invert_regenerate(field, x):
        inverted = jf.invert(field, x, **kw)
        regenerated = jf.generate(field, inverted.value, **kw)
        return inverted.value, regenerated.value, (inverted.result, regenerated.result)

    def jvp(field, zhat, u):
        # one JVP through the whole generation solve (its primal is the regenerate)
        return jf.intrinsic_instability(lambda z: jf.generate(field, z, **kw).value, zhat, u)

    def fd_regenerate(field, zhat, u):
        n = fd_eps * jnp.linalg.norm(zhat) * u
        perturbed = jf.generate(field, zhat + n, **kw)
        return perturbed.value, jnp.linalg.norm(n), perturbed.result

    def topk(field, zhat, key):
        def step(z, i):  # one Euler step of generation on the grid: the step map
            s0, s1 = sigmas[i], sigmas[i + 1]
            return z + (s1 - s0) * field.velocity(z, s0)

        spectrum = jf.lyapunov_spectrum_of_map(
            step, zhat, steps, k=top_k, key=key, save_stretch=False, throw=False
        )
        return spectrum.value.exponents, spectrum.result

    stages = dict(
        invert_regenerate=invert_regenerate, jvp=jvp, fd_regenerate=fd_regenerate, topk=topk
    )
    return {key: eqx.filter_jit(fn) for key, fn in stages.items()}


def _outcome_error(results) -> str | None:
    """The first failure among `jf.RESULTS` items, as text, else None."""
    import jaxflow as jf

    for result in results:
        message = str(jf.result_messages(result).item())
        if message:
            return f"n/a ({message[:200]})"
    return None


def _jax_study_run(field, x, u, key, times, top_k, fd_eps, precision, timing) -> tuple:
    """jaxflow's stages at one step count, each compiled (timed apart) then timed:
    (timings and results, outputs to compare)."""
    import jax
    import jax.numpy as jnp

    sync, repeats, memory = timing
    fns = _study_functions(times, top_k, fd_eps)
    part, outs = {}, {}
    for stage in JAX_STAGES:
        if stage == "invert_regenerate":
            args = (field, x)
        elif "invert_regenerate" not in outs:
            part[f"{stage}_error"] = "n/a (no inversion)"
            continue
        else:
            args = (field, outs["invert_regenerate"][0], key if stage == "topk" else u)
        try:
            with jax.default_matmul_precision(precision):
                start = time.perf_counter()
                compiled = fns[stage].lower(*args).compile()
                part[f"{stage}_compile_s"] = time.perf_counter() - start
                out = _stage(part, stage, lambda c=compiled, a=args: c(*a), sync, repeats, memory)
            del compiled
        except Exception as e:  # recorded: OOM at compile time, ...
            part[f"{stage}_error"] = _failure(e)
            out = None
        if out is not None:
            outs[stage] = out
        gc.collect()
    errors = []
    if "invert_regenerate" in outs:
        zhat, xhat, results = outs["invert_regenerate"]
        errors.append(_outcome_error(results))
        part["R"] = float(jnp.linalg.norm(x - xhat) / np.sqrt(x.size))
        if "jvp" in outs:
            part["E_jvp"] = float(outs["jvp"])
        if "fd_regenerate" in outs:
            perturbed, n_norm, result = outs["fd_regenerate"]
            errors.append(_outcome_error([result]))
            part["E_fd"] = float(jnp.linalg.norm(perturbed - xhat) / n_norm)
        if "topk" in outs:
            exponents, result = outs["topk"]
            errors.append(_outcome_error([result]))
            part["exponents"] = [float(e) for e in np.asarray(exponents)]
    errors = [e for e in errors if e]
    if errors:  # a non-finite solve: its numbers are NaN, and said so
        part["solve_error"] = errors[0]
    return part, outs.get("invert_regenerate")


def _jax_study_worker(spec: dict, emit) -> None:
    """jaxflow's route: `jf.invert` / `jf.generate` with `solver="euler"` on the
    grid, the exact JVP through the generation solve, the finite-difference
    regenerate and the top-k Lyapunov exponents, compiled apart (compile time
    recorded apart) and timed as medians of `repeats` calls after a warm-up."""
    import jax
    import jax.numpy as jnp
    import torch

    device = "cpu" if spec["tiny"] or not torch.cuda.is_available() else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    jax_device = jax.devices()[0]
    memory = _Memory("jax", jax_device)
    cpu = jax_device.platform == "cpu"
    base = dict(
        framework="jaxflow",
        mode="study",
        device=f"cpu ({platform.machine()})" if cpu else str(jax_device.device_kind),
        memory_kind=memory.kind,
        top_k=spec["study"]["top_k"],
        jax=jax.__version__,
        equinox=importlib.metadata.version("equinox"),
    )
    timing = (jax.block_until_ready, spec["repeats"], memory)
    for name, dtype_name, sizes in spec["cases"]:
        family, config, length = _model_setup(name, spec["tiny"])
        try:
            start = time.perf_counter()
            port = jax.block_until_ready(_port(family, config, dtype_name, device)[0])
            build_s = time.perf_counter() - start
        except Exception as e:  # recorded, e.g. an OOM
            for size in sizes:
                emit(dict(base, model=name, size=size, dtype=dtype_name, error=_failure(e)))
            continue
        # float32 matmuls in float32 (not TF32) on a GPU, as torch with TF32 off
        precision = "highest" if dtype_name == "float32" else None
        for size in sizes:
            inp = _inputs(family, config, length, size)
            field = _field(family, port, inp, size)
            # the state in float32 whatever the network's dtype, as in the example
            # (`model.encode` gives float32 latents; jaxflow's solvers keep it)
            x = jnp.asarray(inp["latent"].reshape(-1))
            u = jnp.asarray(_direction(inp))
            key = jax.random.key(SEED)
            parts = {}
            for steps in spec["study"]["steps"]:
                times = jnp.asarray(_study_sigmas(family, size, steps)[::-1].copy())
                part, solved = _jax_study_run(
                    field,
                    x,
                    u,
                    key,
                    times,
                    spec["study"]["top_k"],
                    STUDY_FD_EPS[dtype_name],
                    precision,
                    timing,
                )
                ref_file = _study_ref_file(spec, name, size, dtype_name, steps)
                ref = dict(np.load(ref_file)) if ref_file.exists() else {}
                if solved is not None and "xhat" in ref:
                    # the two routes compute the same thing: jaxflow against diffusers
                    part["invert_max_rel_diff"] = _rel(np.asarray(solved[0]), ref["zhat"])
                    part["regenerate_max_rel_diff"] = _rel(np.asarray(solved[1]), ref["xhat"])
                if "E_jvp" in part and "E_fd" in part:
                    part["E_fd_vs_E_jvp"] = abs(part["E_fd"] / part["E_jvp"] - 1)
                if "E_jvp" in part and "E_fd" in ref:
                    part["E_fd_torch"] = float(ref["E_fd"])
                    part["E_fd_torch_vs_E_jvp"] = abs(part["E_fd_torch"] / part["E_jvp"] - 1)
                parts[steps] = part
                del solved, ref
                gc.collect()
            emit(_study_record(dict(base, build_s=build_s), name, size, dtype_name, parts))
            del field, x, u
            gc.collect()
        del port
        gc.collect()


def _extrapolate(ms_by_steps: dict) -> tuple[float, float, str]:
    """(per-image ms at the paper's 500 steps, per-step ms, how) from per-image ms
    at S steps. One S: linear, ms / S a step. Several: the least-squares line
    a + b S, which separates a solve's fixed cost (jaxflow's solves evaluate the
    field once more, at the start, to tell a non-finite field from a failed
    solve: S + 1 evaluations for S steps) from the per-step cost b; linear where
    the fitted b is not positive (noise)."""
    steps = np.array(sorted(ms_by_steps), float)
    ms = np.array([ms_by_steps[s] for s in sorted(ms_by_steps)], float)
    if len(steps) > 1:
        b, a = np.polyfit(steps, ms, 1)
        if b > 0:
            return float(a + b * STUDY_STEPS), float(b), "affine"
    per_step = float(ms[-1] / steps[-1])
    return per_step * STUDY_STEPS, per_step, "linear"


def study_summary(records: list[dict]) -> list[dict]:
    """Per (model, size, dtype): each route's per-image ms at the largest S, its
    per-step ms, the 100-image, 500-step estimate in hours, and the ratio of
    jaxflow's exact route (invert + regenerate + JVP) to the paper's (invert +
    regenerate + finite-difference regenerate), at S and at 500 steps."""
    # a study run's records are all study records, a failed case's too
    index = {(r["model"], r["size"], r["dtype"], r["framework"]): r for r in records}
    out = []
    for model, size, dtype in sorted(
        {k[:3] for k in index}, key=lambda k: (list(MODELS).index(k[0]), k[1], k[2])
    ):
        row = dict(model=model, size=size, dtype=dtype)
        for route, (framework, stages) in ROUTES.items():
            rec = index.get((model, size, dtype, framework), {})
            by_steps = {}
            for steps, part in rec.get("by_steps", {}).items():
                if all(isinstance(part.get(f"{s}_ms"), float) for s in stages):
                    by_steps[int(steps)] = sum(part[f"{s}_ms"] for s in stages)
            if not by_steps:
                continue
            row["steps"] = max(by_steps)
            at_500, per_step, how = _extrapolate(by_steps)
            row[f"{route}_ms"] = by_steps[max(by_steps)]
            row[f"{route}_per_step_ms"] = per_step
            row[f"{route}_500_steps_ms"] = at_500
            row[f"{route}_{STUDY_IMAGES}_images_h"] = at_500 * STUDY_IMAGES / 3.6e6
            row["extrapolation"] = how
        exact, paper = "jaxflow_exact_route", "torch_paper_route"
        if f"{exact}_ms" in row and f"{paper}_ms" in row:
            row["exact_over_paper"] = row[f"{exact}_ms"] / row[f"{paper}_ms"]
            row["exact_over_paper_500_steps"] = (
                row[f"{exact}_500_steps_ms"] / row[f"{paper}_500_steps_ms"]
            )
            row["goal"] = STUDY_GOAL
            row["goal_met"] = row["exact_over_paper_500_steps"] <= STUDY_GOAL
        out.append(row)
    return out


def study_table(records: list[dict]) -> str:
    """The study's costs as markdown: the stages of each route at the largest S,
    then the routes per image, their ratio and the 100-image, 500-step estimates."""
    # a study run's records are all study records, a failed case's too
    index = {(r["model"], r["size"], r["dtype"], r["framework"]): r for r in records}
    stages = [
        "| model | size | dtype | S | framework | compile s (inv+regen / JVP / FD / top-k) "
        "| invert + regenerate ms | JVP ms | FD regenerate ms | top-k ms "
        "| regenerate max rel diff vs diffusers | E_jvp | E_fd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    routes = [
        "| model | size | dtype | S | jaxflow exact route ms (inv + regen + JVP) "
        "| torch paper route ms (inv + regen + FD regen) | exact / paper at S "
        f"| exact / paper at {STUDY_STEPS} steps (goal <= {STUDY_GOAL}) "
        "| jaxflow top-k ms (extra) | jaxflow whole study ms (+ FD + top-k) "
        f"| {STUDY_IMAGES} images x {STUDY_STEPS} steps, h: jaxflow exact / jaxflow whole "
        "study / torch paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = study_summary(records)
    for model, size, dtype in sorted(
        {k[:3] for k in index}, key=lambda k: (list(MODELS).index(k[0]), k[1], k[2])
    ):
        for framework in ("jaxflow", "diffusers"):
            rec = index.get((model, size, dtype, framework))
            if rec is None:
                continue
            steps = _num(max(rec["steps"]), "d") if rec.get("steps") else "-"
            head = f"| {model} | {size}^2 | {dtype} | {steps} | {framework} "
            if "error" in rec:
                stages.append(head + f"| - | {rec['error']} | - | - | - | - | - | - |")
                continue
            compile_s = " / ".join(_cell(rec, f"{s}_compile_s", ".1f") for s in JAX_STAGES)
            e_fd = _cell(rec, "E_fd", ".4g")
            if "solve_error" in rec:
                e_fd += f" ({rec['solve_error']})"
            cells = [_cell(rec, f"{s}_ms", ".1f", True) for s in JAX_STAGES]
            diff = "reference"
            if framework == "jaxflow":
                diff = _cell(rec, "regenerate_max_rel_diff", ".1e")
            stages.append(
                head + f"| {compile_s if framework == 'jaxflow' else 'eager'} "
                f"| {' | '.join(cells)} "
                f"| {diff} "
                f"| {_cell(rec, 'E_jvp', '.4g')} | {e_fd} |"
            )
    for row in summary:
        head = (
            f"| {row['model']} | {row['size']}^2 | {row['dtype']} | {_num(row.get('steps'), 'd')} "
        )
        hours = " / ".join(
            _num(row.get(f"{k}_{STUDY_IMAGES}_images_h"), ".2f")
            for k in ("jaxflow_exact_route", "jaxflow_whole_study", "torch_paper_route")
        )
        routes.append(
            head + f"| {_num(row.get('jaxflow_exact_route_ms'), '.1f')} "
            f"| {_num(row.get('torch_paper_route_ms'), '.1f')} "
            f"| {_num(row.get('exact_over_paper'), '.2f')} "
            f"| {_num(row.get('exact_over_paper_500_steps'), '.2f')} "
            f"| {_num(row.get('jaxflow_topk_ms'), '.1f')} "
            f"| {_num(row.get('jaxflow_whole_study_ms'), '.1f')} | {hours} |"
        )
    hows = sorted({row["extrapolation"] for row in summary if "extrapolation" in row})
    note = (
        "Per image (batch 1, one device, compile time apart) at S Euler steps each way; "
        f"{STUDY_STEPS} steps and {STUDY_IMAGES} images extrapolated from the per-step cost, "
        f"here {' / '.join(hows) or '-'} (linear from one S: ms / S a step; affine from "
        "several: the least-squares line, a fixed cost per solve plus a cost per step)."
    )
    return "\n".join(stages) + "\n\n" + "\n".join(routes) + "\n\n" + note


def _worker(spec: dict) -> None:
    if spec["framework"] == "jaxflow":
        import jax

        # JAX's CUDA libraries first, then torch's (which only draws the weights there)
        jax.devices()
    import torch
    from diffusers.utils import logging as diffusers_logging

    # `to(dtype)` of a model built on `meta` warns about modules kept in float32: none
    diffusers_logging.set_verbosity_error()
    if spec["tiny"]:
        # one thread (JAX's Eigen too, through XLA_FLAGS): on a small shared machine
        # torch's thread pool, oversubscribed, made tiny matmuls 100x slower
        torch.set_num_threads(1)
    with open(spec["out"], "a") as out:

        def emit(rec):
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(RESULT + _summary(rec), flush=True)

        if spec.get("study"):
            workers = _torch_study_worker, _jax_study_worker
        else:
            workers = _torch_worker, _jax_worker
        workers[spec["framework"] != "diffusers"](spec, emit)


def _summary(rec: dict) -> str:
    keys = ("forward_ms", "forward_math_ms", "jvp_ms", "forward_max_rel_diff", "jvp_max_rel_diff")
    if rec.get("mode") == "study":
        keys = (*(f"{s}_ms" for s in JAX_STAGES), "regenerate_max_rel_diff", "E_jvp", "E_fd")
    parts = [f"{rec['framework']} {rec['model']} {rec['size']} {rec['dtype']}:"]
    parts += [f"{k}={rec[k]:.4g}" for k in keys if isinstance(rec.get(k), float)]
    parts += [f"{k}={v}" for k, v in rec.items() if k.endswith("error")]
    return " ".join(parts)


# ---------------------------------------------------------------------------- driver


def _groups(args) -> list[dict]:
    """The worker processes, each a framework and its cases `[model, dtype, sizes]`;
    diffusers before jaxflow for each case (the jaxflow worker compares with the
    outputs the diffusers worker saved)."""
    frameworks = ["jaxflow"] if args.skip_torch else ["diffusers", "jaxflow"]
    if args.isolation == "framework":
        cases = [[m, d, args.sizes] for m in args.models for d in args.dtypes]
        return [dict(framework=fw, cases=cases) for fw in frameworks]
    groups = []
    for model in args.models:
        if args.isolation == "model":
            cases = [[model, d, args.sizes] for d in args.dtypes]
            groups += [dict(framework=fw, cases=cases) for fw in frameworks]
            continue
        for dtype in args.dtypes:
            chunks = [[s] for s in args.sizes] if args.isolation == "size" else [args.sizes]
            for chunk in chunks:
                groups += [dict(framework=fw, cases=[[model, dtype, chunk]]) for fw in frameworks]
    return groups


def _run_groups(args, workdir: pathlib.Path, write) -> list[dict]:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.tiny:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    records = []
    deadline = None if args.budget is None else time.monotonic() + args.budget
    for i, group in enumerate(_groups(args)):
        spec = dict(
            group,
            tiny=args.tiny,
            repeats=args.repeats,
            study=args.study_settings,
            workdir=str(workdir),
            out=str(workdir / f"worker_{i}.jsonl"),
        )
        timeout = args.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
        cases = [(m, d, s) for m, d, sizes in spec["cases"] for s in sizes]
        if timeout < 20:
            for case in cases:
                records.append(_error_record(group, case, "n/a (skipped: --budget spent)"))
            write(records)
            continue
        print(f"--- {group['framework']}: {spec['cases']}", flush=True)
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        start = time.perf_counter()
        failure = None
        try:
            done = subprocess.run(command, env=env, timeout=timeout)
            if done.returncode:
                failure = f"n/a (worker exited with code {done.returncode})"
        except subprocess.TimeoutExpired:
            failure = f"n/a (timeout after {timeout:.0f} s)"
        got = []
        if os.path.exists(spec["out"]):
            with open(spec["out"]) as f:
                got = [json.loads(line) for line in f if line.strip()]
        for rec in got:
            rec["worker_wall_s"] = time.perf_counter() - start
        records += got
        seen = {(r["model"], r["dtype"], r["size"]) for r in got}
        for case in cases:
            if case not in seen:
                records.append(_error_record(group, case, failure or "n/a (no result)"))
        write(records)
    return records


def _error_record(group: dict, case: tuple, reason: str) -> dict:
    model, dtype, size = case
    return dict(framework=group["framework"], model=model, size=size, dtype=dtype, error=reason)


def _versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "equinox", "torch", "diffusers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------- table


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cell(rec: dict, key: str, fmt: str, error: bool = False) -> str:
    """`rec[key]` formatted; where it is missing, the error of its phase (forward,
    forward_math, jvp) if `error`, else "-"."""
    if isinstance(rec.get(key), float | int):
        return format(rec[key], fmt)
    phase = "forward_math" if key.startswith("forward_math") else key.split("_")[0]
    return (rec.get(f"{phase}_error") or "-") if error else "-"


def table(records: list[dict]) -> str:
    """The results as markdown: one block of rows per (model, size, dtype), then the
    ratios to diffusers."""
    index = {(r["model"], r["size"], r["dtype"], r["framework"]): r for r in records}
    keys = sorted(
        {(r["model"], r["size"], r["dtype"]) for r in records},
        key=lambda k: (list(MODELS).index(k[0]), k[1], k[2]),
    )
    lines = [
        "| model | size | dtype | framework | compile s (fwd / JVP) | forward ms | JVP ms "
        "| JVP/forward | peak GB (fwd / JVP) | max rel diff vs diffusers (fwd / JVP) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = [
        "| model | size | dtype | jaxflow fwd / diffusers fwd (default SDPA) "
        "| jaxflow fwd / diffusers fwd (math SDPA) | jaxflow JVP / diffusers JVP (math SDPA) |",
        "|---|---|---|---|---|---|",
    ]

    def pair(rec, a, b, fmt):
        return f"{_cell(rec, a, fmt)} / {_cell(rec, b, fmt)}"

    for model, size, dtype in keys:
        j = index.get((model, size, dtype, "jaxflow"), {})
        d = index.get((model, size, dtype, "diffusers"), {})
        head = f"| {model} | {size}^2 | {dtype} "
        for framework, rec in (("jaxflow", j), ("diffusers", d)):
            if "error" in rec:  # the whole case failed (timeout, crash, budget spent)
                lines.append(head + f"| {framework} | - | {rec['error']} | - | - | - | - |")
        if j and "error" not in j:
            diff = pair(j, "forward_max_rel_diff", "jvp_max_rel_diff", ".1e") if d else "-"
            lines.append(
                head + f"| jaxflow | {pair(j, 'forward_compile_s', 'jvp_compile_s', '.1f')} "
                f"| {_cell(j, 'forward_ms', '.1f', True)} | {_cell(j, 'jvp_ms', '.1f', True)} "
                f"| {_num(j.get('jvp_over_forward'), '.2f')} "
                f"| {pair(j, 'forward_peak_gb', 'jvp_peak_gb', '.2f')} | {diff} |"
            )
        if d and "error" not in d:
            lines.append(
                head + f"| diffusers (default SDPA) | eager "
                f"| {_cell(d, 'forward_ms', '.1f', True)} | - | - "
                f"| {_cell(d, 'forward_peak_gb', '.2f')} | reference |"
            )
            lines.append(
                head + f"| diffusers (math SDPA) | eager "
                f"| {_cell(d, 'forward_math_ms', '.1f', True)} | {_cell(d, 'jvp_ms', '.1f', True)} "
                f"| {_num(d.get('jvp_over_forward_math'), '.2f')} "
                f"| {pair(d, 'forward_math_peak_gb', 'jvp_peak_gb', '.2f')} | - |"
            )
        if j and d:
            cells = []
            for a, b in (
                ("forward_ms", "forward_ms"),
                ("forward_ms", "forward_math_ms"),
                ("jvp_ms", "jvp_ms"),
            ):
                ok = isinstance(j.get(a), float) and isinstance(d.get(b), float)
                cells.append(f"{j[a] / d[b]:.3g}" if ok else "-")
            ratios.append(head + "| " + " | ".join(cells) + " |")
    if len(ratios) == 2:  # --skip-torch
        return "\n".join(lines)
    return "\n".join(lines) + "\n\n" + "\n".join(ratios)


# ---------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated, of {', '.join(MODELS)} (default all; --tiny: "
        f"{','.join(TINY_DEFAULT)}, the tiny-sd3 and tiny-flux configs)",
    )
    p.add_argument(
        "--sizes", default=None, help="image sizes in px (default 512,1024; tiny 128,256)"
    )
    p.add_argument(
        "--dtypes", default=None, help="default bfloat16,float32; --study: bfloat16 (tiny float32)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up call")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    p.add_argument("--out", default="large_models.json")
    p.add_argument(
        "--tiny", action="store_true", help="tiny configs on the CPU (a functional check)"
    )
    p.add_argument("--skip-torch", action="store_true", help="jaxflow only (no diffusers)")
    p.add_argument(
        "--isolation",
        choices=("size", "dtype", "model", "framework"),
        default=None,
        help="one process per (model, size, dtype, framework); per (model, dtype, "
        "framework), sizes ascending (the default); per (model, framework); per "
        "framework (--tiny's default)",
    )
    p.add_argument(
        "--study",
        action="store_true",
        help="the large-model study's cost per image (invert, regenerate, JVP, finite "
        "difference, top-k Lyapunov exponents), jaxflow against the paper's PyTorch route "
        "(default models sd35-medium)",
    )
    p.add_argument(
        "--study-steps",
        default="4",
        help=f"--study: Euler steps each way, comma-separated (default 4): one count is "
        f"extrapolated linearly to {STUDY_STEPS} steps, several by a fitted line (a fixed "
        "cost per solve plus a cost per step)",
    )
    p.add_argument(
        "--top-k", type=int, default=STUDY_TOP_K, help="--study: Lyapunov exponents (default 4)"
    )
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker(json.loads(args.worker))
        return None

    if args.study:
        default_models = "sd35-medium"
    else:
        default_models = ",".join(TINY_DEFAULT if args.tiny else MODELS)
    models = args.models or default_models
    args.models = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    sizes = args.sizes or (("128" if args.study else "128,256") if args.tiny else "512,1024")
    args.sizes = sorted(int(s) for s in sizes.split(","))
    if any(s % 16 or s <= 0 for s in args.sizes):
        p.error("sizes must be positive multiples of 16 (the VAE's 8 times the patch of 2)")
    dtypes = args.dtypes or (
        ("float32" if args.tiny else "bfloat16") if args.study else "bfloat16,float32"
    )
    args.dtypes = [d.strip() for d in dtypes.split(",") if d.strip()]
    if set(args.dtypes) - {"float32", "bfloat16"}:
        p.error("dtypes are float32 and bfloat16")
    try:
        args.study_steps = sorted({int(s) for s in args.study_steps.split(",") if s.strip()})
    except ValueError:
        p.error(f"--study-steps {args.study_steps!r}: comma-separated integers")
    if not args.study_steps or min(args.study_steps) < 1 or args.top_k < 1:
        p.error("--study-steps and --top-k must be positive")
    args.study_settings = dict(steps=args.study_steps, top_k=args.top_k) if args.study else None
    if args.isolation is None:
        args.isolation = "framework" if args.tiny else "dtype"

    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="large_models_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(
        benchmark="benchmarks/large_models.py",
        tiny=args.tiny,
        started=started,
        args=dict(
            models=args.models,
            sizes=args.sizes,
            dtypes=args.dtypes,
            repeats=args.repeats,
            timeout=args.timeout,
            budget=args.budget,
            isolation=args.isolation,
            skip_torch=args.skip_torch,
            study=args.study_settings,
        ),
        sigma=SIGMA,
        flux_guidance=GUIDANCE,
        text_tokens={m: _model_setup(m, args.tiny)[2] for m in args.models},
        versions=_versions(),
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
    )

    start = time.perf_counter()

    def write(records):
        devices = sorted({r["device"] for r in records if "device" in r})
        wall = time.perf_counter() - start
        out = dict(meta, devices=devices, wall_s=wall, cases=records)
        if args.study:
            out["study"] = dict(
                paper_steps=STUDY_STEPS,
                paper_images=STUDY_IMAGES,
                fd_eps=STUDY_FD_EPS,
                goal=f"jaxflow exact route / torch paper route <= {STUDY_GOAL} per image",
                extrapolation=f"per-image ms at {STUDY_STEPS} steps x {STUDY_IMAGES} images; "
                "from one step count S linear (ms / S a step), from several the "
                "least-squares line a + b S (a fixed cost per solve, b a step)",
                summary=study_summary(records),
            )
        tmp = f"{args.out}.tmp"
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.out)

    try:
        records = _run_groups(args, workdir, write)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    devices = sorted({r["device"] for r in records if "device" in r})
    print()
    print(f"devices: {', '.join(devices) or '-'}; versions: {meta['versions']}")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    print()
    print(study_table(records) if args.study else table(records))
    print("\nwrote", args.out)
    return records


if __name__ == "__main__":
    main()
