"""jaxflow.diffusers against live diffusers, on tiny randomly initialised SD3.5-
and FLUX-dev-like pipelines saved to a temporary folder and loaded through the
real loading code (offline, float32, CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("diffusers")

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tiny_models import flux_pipeline, sd3_pipeline  # noqa: E402

import jaxflow as jf  # noqa: E402
import jaxflow.diffusers as jfd  # noqa: E402

SIZE = 128  # pixels: a 16 x 16 latent
SEQ = 16  # T5 tokens of the tiny text encoders


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD3.5-like pipeline, its folder, and the model loaded from it."""
    pipe = sd3_pipeline(0)
    folder = tmp_path_factory.mktemp("sd3")
    pipe.save_pretrained(folder)
    cache = tmp_path_factory.mktemp("sd3_prompts")
    return pipe, folder, jfd.load(folder, prompt_cache=cache)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pipe = flux_pipeline(0)
    folder = tmp_path_factory.mktemp("flux")
    pipe.save_pretrained(folder)
    return pipe, folder, jfd.load(folder, prompt_cache=None)


def grid(model, steps, **size) -> tuple:
    """`model.times(steps)` as a tuple of floats: a static argument of `_solve`, so
    that tests on the same grid share one compiled solve."""
    return tuple(np.asarray(model.times(steps, **size)).tolist())


@eqx.filter_jit
def _solve(field, z, times, solver="euler"):
    """`jf.generate` on the grid `times` (a tuple), the field an argument: one
    compiled program per field structure, grid and solver for the whole module
    (an eager `jf.generate` traces and compiles again at each call)."""
    return jf.generate(field, z, solver=solver, times=np.asarray(times))


@eqx.filter_jit
def _invert(field, x, times):
    return jf.invert(field, x, solver="euler", times=np.asarray(times))


@eqx.filter_jit
def _velocity(field, z):
    return field.velocity(z, 0.5)


def latents(height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 16, height // 8, width // 8)
    return torch.randn(shape, generator=g)


# ---- loading ---------------------------------------------------------------


def test_load_routes_agree(sd3, tmp_path):
    pipe, folder, model = sd3
    assert isinstance(model, jfd.SD3Model)
    from_pipeline = jfd.load(pipe, prompt_cache=None)
    from_transformer = jfd.load(pipe.transformer, prompt_cache=None)
    from_subfolder = jfd.load(folder / "transformer", prompt_cache=None)
    leaves = jax.tree.leaves(eqx.filter(model.transformer, eqx.is_array))
    for other in (from_pipeline, from_transformer, from_subfolder):
        others = jax.tree.leaves(eqx.filter(other.transformer, eqx.is_array))
        assert len(others) == len(leaves)
        for a, b in zip(leaves, others, strict=True):
            np.testing.assert_array_equal(a, b)
    assert from_pipeline.scheduler_config["shift"] == 3.0
    assert from_transformer.scheduler_config["shift"] == 3.0  # the released default


def test_load_bfloat16(sd3):
    _, folder, model = sd3
    half = jfd.load(folder, dtype=jnp.bfloat16, prompt_cache=None)
    dtypes = {x.dtype for x in jax.tree.leaves(eqx.filter(half.transformer, eqx.is_inexact_array))}
    assert jnp.dtype(jnp.bfloat16) in dtypes
    z = jnp.asarray(latents(SIZE, SIZE).numpy().reshape(-1))
    f32 = _velocity(model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ), z)
    bf16 = _velocity(half.field(height=SIZE, width=SIZE, max_sequence_length=SEQ), z)
    assert bf16.dtype == z.dtype
    assert rel(bf16, f32) < 5e-2


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float64, "int8"])
def test_load_refuses_other_dtypes(sd3, dtype):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        jfd.load(sd3[1], dtype=dtype)


def test_load_refuses_non_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers checkpoint"):
        jfd.load(tmp_path)
    with pytest.raises(ValueError, match="neither a folder nor a hub id"):
        jfd.load(str(tmp_path / "missing" / "folder"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="unsupported transformer 'UNet2DConditionModel'"):
        jfd.load(tmp_path)
    with pytest.raises(ValueError, match="cannot load a"):
        jfd.load(object())


def test_load_lists_mismatched_weights(sd3, tmp_path):
    from jaxflow.diffusers import _safetensors

    pipe = sd3[0]
    pipe.transformer.save_pretrained(tmp_path)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    weights = {k: np.array(v) for k, v in _safetensors.read(file).items()}
    weights["transformer_blocks.9.attn.to_q.weight"] = weights.pop(
        "transformer_blocks.2.attn.to_q.weight"
    )
    _safetensors.write(file, weights)
    with pytest.raises(ValueError, match="transformer_blocks.2.attn.to_q.weight") as error:
        jfd.load(tmp_path, prompt_cache=None)
    assert "transformer_blocks.9.attn.to_q.weight" in str(error.value)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_layers"] = 2  # the checkpoint has three
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        jfd.load(tmp_path, prompt_cache=None)


def test_hub_id_goes_through_diffusers_download(tmp_path):
    # offline: diffusers' own download, with its local_files_only and cache_dir
    with pytest.raises(Exception, match="cached snapshot|local_files_only"):
        jfd.load("nobody/not-a-model", local_files_only=True, cache_dir=tmp_path)


# ---- the time grid -----------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 28, 500])
def test_sd3_times_are_the_pipelines_sigmas(sd3, steps):
    pipe, _, model = sd3
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        retrieve_timesteps,
    )

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    retrieve_timesteps(scheduler, steps, "cpu")
    times = model.times(steps, height=SIZE, width=SIZE)
    assert times.dtype == jnp.float32 and times.shape == (steps + 1,)
    np.testing.assert_array_equal(np.asarray(times)[::-1], scheduler.sigmas.numpy())
    if steps == 28:
        np.testing.assert_allclose(float(times[1]), 0.0089286, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 28, 500])
@pytest.mark.parametrize("size", [(128, 128), (256, 512), (1024, 1024)])
def test_flux_times_are_the_pipelines_sigmas(flux, steps, size):
    pipe, _, model = flux
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    height, width = size
    seq = (height // 16) * (width // 16)
    config = pipe.scheduler.config
    mu = calculate_shift(
        seq,
        config.get("base_image_seq_len"),
        config.get("max_image_seq_len"),
        config.get("base_shift"),
        config.get("max_shift"),
    )
    scheduler = type(pipe.scheduler).from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    times = model.times(steps, height=height, width=width)
    np.testing.assert_array_equal(np.asarray(times)[::-1], scheduler.sigmas.numpy())


def test_times_without_diffusers_match(sd3, flux, monkeypatch):
    """The NumPy transcription used on a machine without torch gives the same bits."""
    from jaxflow.diffusers import _schedule

    expected = [m.times(n, height=256, width=512) for m in (sd3[2], flux[2]) for n in (1, 28, 500)]

    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(_schedule, "require", missing)
    got = [m.times(n, height=256, width=512) for m in (sd3[2], flux[2]) for n in (1, 28, 500)]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- generation against the pipelines ------------------------------------------


def _pipeline_latents(pipe, steps, z, **kwargs):
    with torch.no_grad():
        out = pipe(
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            latents=z,
            output_type="latent",
            **kwargs,
        )
    return out.images


def test_sd3_euler_equals_the_pipeline(sd3):
    pipe, _, model = sd3
    z = latents(SIZE, SIZE, seed=1)
    # 16 steps: the grid of test_reconstruction_error_falls_with_steps, one compile
    ref = _pipeline_latents(pipe, 16, z.clone(), prompt="", max_sequence_length=SEQ)
    field = model.field("", height=SIZE, width=SIZE, max_sequence_length=SEQ)
    x = _solve(field, jnp.asarray(z.numpy().reshape(-1)), grid(model, 16))
    assert rel(x, ref.numpy().reshape(-1)) < 1e-5


def test_sd3_guidance_equals_the_pipeline(sd3):
    pipe, _, model = sd3
    z = latents(SIZE, SIZE, seed=2)
    kwargs = dict(prompt="a photo of a cat", negative_prompt="blue dog", guidance_scale=4.0)
    ref = _pipeline_latents(pipe, 4, z.clone(), max_sequence_length=SEQ, **kwargs)
    field = model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ, **kwargs)
    assert field.network.guidance_scale is not None  # two passes
    x = _solve(field, jnp.asarray(z.numpy().reshape(-1)), grid(model, 4))
    assert rel(x, ref.numpy().reshape(-1)) < 1e-5
    # the null prompt against its own negative: guidance changes nothing, one pass
    null = model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    assert null.network.guidance_scale is None


def test_sd3_heun_equals_the_pipelines_heun_scheduler(sd3):
    pipe, _, model = sd3
    from diffusers import FlowMatchHeunDiscreteScheduler, StableDiffusion3Pipeline

    heun = StableDiffusion3Pipeline(
        **{**pipe.components, "scheduler": FlowMatchHeunDiscreteScheduler(shift=3.0)}
    )
    z = latents(SIZE, SIZE, seed=3)
    ref = _pipeline_latents(heun, 5, z.clone(), prompt="", max_sequence_length=SEQ)
    field = model.field("", height=SIZE, width=SIZE, max_sequence_length=SEQ)
    z = jnp.asarray(z.numpy().reshape(-1))
    times = grid(model, 5)
    x = _solve(field, z, times, jfd.FlowMatchHeun())
    assert rel(x, ref.numpy().reshape(-1)) < 1e-5
    # diffrax's Heun takes a second stage on the last step too: not the scheduler
    assert rel(_solve(field, z, times, "heun"), ref.numpy().reshape(-1)) > 1e-4


@pytest.mark.parametrize("size", [(128, 128), (128, 192)])
def test_flux_euler_equals_the_pipeline(flux, size):
    pipe, _, model = flux
    height, width = size
    g = torch.Generator().manual_seed(4)
    z = torch.randn((1, 16, height // 8, width // 8), generator=g)
    packed = pipe._pack_latents(z, 1, 16, height // 8, width // 8)
    with torch.no_grad():
        ref = pipe(
            prompt="a red cat",
            height=height,
            width=width,
            num_inference_steps=4,
            latents=packed,
            output_type="latent",
            guidance_scale=2.5,
            max_sequence_length=SEQ,
        ).images
    ref = pipe._unpack_latents(ref, height, width, pipe.vae_scale_factor)
    field = model.field(
        "a red cat", height=height, width=width, guidance=2.5, max_sequence_length=SEQ
    )
    times = grid(model, 4, height=height, width=width)
    x = _solve(field, jnp.asarray(z.numpy().reshape(-1)), times)
    assert rel(x, ref.numpy().reshape(-1)) < 1e-5


# ---- differentiation ---------------------------------------------------------


def test_jvp_of_generation_matches_central_differences(sd3):
    _, _, model = sd3
    field = model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    times = grid(model, 4)  # the solve of test_reconstruction_error_falls_with_steps
    z = jnp.asarray(latents(SIZE, SIZE, seed=5).numpy().reshape(-1))
    u = jnp.asarray(np.random.default_rng(0).standard_normal(z.shape), jnp.float32)

    _, tangent = jax.jvp(lambda z: _solve(field, z, times), (z,), (u,))
    eps = 1e-2
    central = (_solve(field, z + eps * u, times) - _solve(field, z - eps * u, times)) / (2 * eps)
    assert rel(tangent, central) < 2e-3


# ---- prompts ------------------------------------------------------------------


def test_null_prompt_goes_through_the_text_encoders(sd3):
    pipe, _, model = sd3
    context, pooled = model.encode_prompt("", max_sequence_length=SEQ)
    with torch.no_grad():
        ref = pipe.encode_prompt(
            prompt="",
            prompt_2=None,
            prompt_3=None,
            device="cpu",
            do_classifier_free_guidance=False,
            max_sequence_length=SEQ,
        )
    np.testing.assert_array_equal(context, ref[0][0].numpy())
    np.testing.assert_array_equal(pooled, ref[2][0].numpy())
    assert float(jnp.max(jnp.abs(context))) > 0  # not zeros


def test_prompt_embeddings_are_cached_on_disk(sd3, tmp_path):
    _, folder, _ = sd3
    first = jfd.load(folder, prompt_cache=tmp_path)
    context, pooled = first.encode_prompt("a dog", max_sequence_length=SEQ)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    second = jfd.load(folder, prompt_cache=tmp_path)

    def no_encoders(what):
        raise AssertionError("the text encoders ran although the prompt was cached")

    second.components.pipeline = no_encoders
    again = second.encode_prompt("a dog", max_sequence_length=SEQ)
    np.testing.assert_array_equal(again[0], context)
    np.testing.assert_array_equal(again[1], pooled)


# ---- the VAE --------------------------------------------------------------------


def test_encode_decode_match_the_vae(sd3):
    pipe, _, model = sd3
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, SIZE, SIZE + 64, 3)).astype(np.float32)
    z = model.encode(images)
    assert z.shape == (2, 16 * 16 * 24) and z.dtype == jnp.float32
    vae = pipe.vae
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2)) * 2 - 1
        mean = vae.encode(x).latent_dist.mean
        ref = (mean - vae.config.shift_factor) * vae.config.scaling_factor
        assert rel(z, ref.numpy().reshape(2, -1)) < 1e-5
        decoded = vae.decode(ref / vae.config.scaling_factor + vae.config.shift_factor).sample
    images_back = model.decode(ref.numpy().reshape(2, -1), height=SIZE, width=SIZE + 64)
    expected = ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images_back.shape == images.shape
    assert np.max(np.abs(images_back - expected)) < 1e-5
    assert model.encode(images[0]).shape == (16 * 16 * 24,)  # one image, one point


def test_bad_sizes_and_shapes_name_the_fix(sd3, flux):
    _, _, model = sd3
    with pytest.raises(ValueError, match="multiple of 16"):
        model.field(height=120, width=128)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.encode(np.zeros((100, 128, 3), np.float32))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        model.encode(np.full((128, 128, 3), 2.0, np.float32))
    field = model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="model.field\\(height=..., width=...\\)"):
        field.velocity(jnp.zeros(16 * 8 * 8), 0.5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        model.times(0)
    with pytest.raises(ValueError, match="no guidance embedding"):
        nog = jfd.load(
            flux_pipeline(1, text_encoders=False, guidance_embeds=False).transformer,
            prompt_cache=None,
        )
        nog.field(
            prompt_embeds=jnp.zeros((4, 32)), pooled_prompt_embeds=jnp.zeros(24), guidance=3.5
        )


def test_missing_torch_names_the_extra(monkeypatch):
    from jaxflow.diffusers import _torch

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"jaxflow\[diffusers\]"):
        _torch.require("torch")


# ---- saving in JAX form ----------------------------------------------------------


def test_saved_model_runs_without_torch(sd3, tmp_path):
    """`model.save` then `jfd.load` in a process where torch and diffusers cannot be
    imported: the same velocity, the same grid, the cached null prompt."""
    _, _, model = sd3
    model.encode_prompt("", max_sequence_length=SEQ)
    model.save(tmp_path / "saved")
    z = latents(SIZE, SIZE, seed=6).numpy().reshape(-1)
    field = model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    expected = _solve(field, jnp.asarray(z), grid(model, 4))  # a compile other tests share
    np.save(tmp_path / "z.npy", z)
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError(name + " is blocked")
        sys.meta_path.insert(0, Block())
        import equinox as eqx, jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        import jaxflow as jf, jaxflow.diffusers as jfd
        model = jfd.load({str(tmp_path / "saved")!r})
        field = model.field(height={SIZE}, width={SIZE}, max_sequence_length={SEQ})
        z = jnp.asarray(np.load({str(tmp_path / "z.npy")!r}))
        # jitted with the field an argument: an eager call compiles op by op
        times = model.times(4)
        x = eqx.filter_jit(lambda f, z: jf.generate(f, z, solver="euler", times=times))(field, z)
        np.save({str(tmp_path / "x.npy")!r}, np.asarray(x))
        assert "torch" not in sys.modules
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    assert rel(np.load(tmp_path / "x.npy"), expected) < 1e-6
    reloaded = jfd.load(tmp_path / "saved")
    np.testing.assert_allclose(
        reloaded.decode(expected, height=SIZE, width=SIZE),
        model.decode(expected, height=SIZE, width=SIZE),
        atol=1e-6,
    )


# ---- a round trip ----------------------------------------------------------------


@pytest.mark.timeout(120)  # about 5x its idle time on 2 cores
def test_reconstruction_error_falls_with_steps(sd3):
    _, _, model = sd3
    field = model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    rng = np.random.default_rng(1)
    x = model.encode(rng.uniform(0.2, 0.8, (SIZE, SIZE, 3)).astype(np.float32))

    def error(steps):
        # a grid is static: one compiled solve per grid and direction, the
        # generating ones shared with the parity, JVP and saving tests
        times = grid(model, steps)
        back = np.asarray(_solve(field, _invert(field, x, times), times), np.float64)
        x64 = np.asarray(x, np.float64)
        return np.linalg.norm(back - x64) / np.linalg.norm(x64)

    errors = [error(n) for n in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0]


def test_field_is_an_argument_not_a_constant(sd3):
    """Passing the field to `jit` keeps its weights out of the compiled program."""
    _, _, model = sd3
    field = model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    z = jnp.zeros(16 * 16 * 16, jnp.float32)
    lowered = eqx.filter_jit(lambda f, z: f.velocity(z, 0.5)).lower(field, z)
    n_weights = sum(x.size for x in jax.tree.leaves(eqx.filter(field, eqx.is_array)))
    assert len(lowered.as_text()) < 4 * n_weights  # the text would hold every weight


def test_solver_is_a_diffrax_solver():
    assert isinstance(jfd.FlowMatchHeun(), diffrax.AbstractSolver)


def test_every_analysis_runs_on_a_ported_model(flux):
    """reconstruct, intrinsic_instability, batch_map and Lyapunov top-k on FLUX,
    unchanged: the field is an ordinary jaxflow field."""
    _, _, model = flux
    # the size and grid of test_flux_euler_equals_the_pipeline[size0]: its solve
    field = model.field("a dog", height=SIZE, width=SIZE, max_sequence_length=SEQ)
    times = grid(model, 4, height=SIZE, width=SIZE)
    n = 16 * (SIZE // 8) ** 2
    # points and checks in NumPy: each eager jnp operation compiles a program
    zs = np.random.default_rng(1).standard_normal((2, n)).astype(np.float32)

    def gen(z):
        return _solve(field, jnp.asarray(z), times)

    xs = np.stack([gen(z) for z in zs])
    np.testing.assert_allclose(
        jf.batch_map(gen, jnp.asarray(zs), batch_size=1), xs, rtol=1e-5, atol=1e-5
    )
    back = eqx.filter_jit(
        lambda field, x: jf.reconstruct(field, x, solver="euler", times=np.asarray(times))
    )(field, jnp.asarray(xs[0]))
    assert back.shape == (n,) and np.all(np.isfinite(back))
    u = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    e = jf.intrinsic_instability(gen, jnp.asarray(zs[0]), jnp.asarray(u))
    eps = np.float32(1e-2)
    diff = np.asarray(gen(zs[0] + eps * u), np.float64) - np.asarray(gen(zs[0] - eps * u))
    fd = np.linalg.norm(diff) / (2 * eps * np.linalg.norm(u.astype(np.float64)))
    assert abs(float(e) / float(fd) - 1) < 1e-3

    sigmas = jnp.asarray(times[::-1], jnp.float32)

    def euler_step(x, i):
        return x + (sigmas[i + 1] - sigmas[i]) * field.velocity(x, sigmas[i])

    spectrum = jf.lyapunov_spectrum_of_map(
        euler_step, jnp.asarray(zs[0]), 3, k=2, key=jax.random.key(3)
    )
    exponents = np.asarray(spectrum.exponents)
    assert exponents.shape == (2,) and np.all(np.isfinite(exponents))
    assert exponents[0] >= exponents[1]


# ---- issue 26: no silent wrong number ----------------------------------------------


@pytest.fixture(scope="module")
def sd3_unsaved():
    """The tiny SD3 pipeline (the `sd3` fixture's weights) without text encoders,
    never written by `save_pretrained`, which adds `_class_name` to the config of
    the object it saves."""
    return sd3_pipeline(0, text_encoders=False)


@pytest.fixture(scope="module")
def sd3_bare(sd3_unsaved):
    """The tiny SD3 from its transformer object alone: no text encoders, no VAE."""
    return jfd.load(sd3_unsaved.transformer, prompt_cache=None)


def _same_leaves(a, b) -> None:
    leaves_a = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    leaves_b = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_guidance_with_prompt_embeds_is_never_dropped(sd3, flux, sd3_bare):
    """SD3: embeddings with `guidance_scale` guide against `negative_prompt` (`""`),
    as diffusers does, giving the very field of the text prompt; a model that
    cannot encode it refuses. FLUX's distilled guidance is an input either way."""
    _, _, model = sd3
    size = dict(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    context, pooled = model.encode_prompt("a photo of a cat", max_sequence_length=SEQ)
    embeds = dict(prompt_embeds=context, pooled_prompt_embeds=pooled)
    from_text = model.field("a photo of a cat", guidance_scale=4.0, **size)
    from_embeds = model.field(guidance_scale=4.0, **embeds, **size)
    assert from_embeds.network.guidance_scale is not None  # two passes
    _same_leaves(from_embeds, from_text)
    # embeddings equal to the negative prompt's: guidance changes nothing, one pass
    null = model.encode_prompt("", max_sequence_length=SEQ)
    one_pass = model.field(prompt_embeds=null[0], pooled_prompt_embeds=null[1], **size)
    assert one_pass.network.guidance_scale is None
    # the null prompt encoded at another length than the embeddings': name the fix
    with pytest.raises(ValueError, match=f"max_sequence_length={SEQ}"):
        model.field(guidance_scale=4.0, height=SIZE, width=SIZE, **embeds)
    # no text encoders: refuse, naming what to pass
    with pytest.raises(ValueError, match="negative_prompt_embeds=.*guidance_scale=1"):
        sd3_bare.field(guidance_scale=7.0, **embeds, **size)
    unguided = sd3_bare.field(guidance_scale=1.0, **embeds, **size)
    assert unguided.network.guidance_scale is None
    # FLUX-dev: the distilled guidance goes in with embeddings as with text
    fmodel = flux[2]
    fcontext, fpooled = fmodel.encode_prompt("a red cat", max_sequence_length=SEQ)
    fsize = dict(height=SIZE, width=SIZE, guidance=2.5)
    ftext = fmodel.field("a red cat", max_sequence_length=SEQ, **fsize)
    fembeds = fmodel.field(prompt_embeds=fcontext, pooled_prompt_embeds=fpooled, **fsize)
    assert float(fembeds.network.guidance) == 2.5
    _same_leaves(fembeds, ftext)


def test_non_finite_prompt_embeddings_are_refused(sd3, flux):
    _, _, model = sd3
    context, pooled = model.encode_prompt("", max_sequence_length=SEQ)
    bad = np.array(context)
    bad[3, 1] = np.nan
    size = dict(height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="prompt_embeds.*1 of .* not finite"):
        model.field(prompt_embeds=bad, pooled_prompt_embeds=pooled, **size)
    inf = np.array(pooled)
    inf[0] = np.inf
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds"):
        model.field(
            prompt_embeds=context,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=context,
            negative_pooled_prompt_embeds=inf,
            guidance_scale=3.0,
            **size,
        )
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        model.field(prompt_embeds=context, pooled_prompt_embeds=pooled, guidance_scale=np.nan)
    fcontext, fpooled = flux[2].encode_prompt("", max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        flux[2].field(prompt_embeds=fcontext, pooled_prompt_embeds=fpooled * np.nan, **size)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        flux[2].field(prompt_embeds=fcontext, pooled_prompt_embeds=fpooled, guidance=np.inf)


def _transformer_folder(folder, tensors: dict) -> None:
    from jaxflow.diffusers import _safetensors

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(jfd.transformer_config("tiny-sd3")))
    _safetensors.write(folder / "diffusion_pytorch_model.safetensors", tensors)


def test_corrupt_safetensors_name_the_file_the_tensor_and_the_fix(tmp_path):
    tensors = {"a.weight": np.ones((4, 8), np.float32), "b.weight": np.ones((32, 128), np.float32)}
    _transformer_folder(tmp_path / "cut", tensors)
    file = tmp_path / "cut" / "diffusion_pytorch_model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated") as error:
        jfd.load(tmp_path / "cut", prompt_cache=None)
    message = str(error.value)
    assert str(file) in message and "'b.weight'" in message
    assert f"expected {len(raw)} bytes, found {len(raw) // 2}" in message
    assert "download" in message
    _transformer_folder(tmp_path / "garbage", tensors)
    file = tmp_path / "garbage" / "diffusion_pytorch_model.safetensors"
    file.write_bytes((20).to_bytes(8, "little") + b"<html>not found</html>" + raw[30:])
    with pytest.raises(ValueError, match="not a safetensors header") as error:
        jfd.load(tmp_path / "garbage", prompt_cache=None)
    assert str(file) in str(error.value) and "download" in str(error.value)
    file.write_bytes(b"<!DOCTYPE html><html>" + raw[21:])  # a length beyond the file
    with pytest.raises(ValueError, match="not a safetensors"):
        jfd.load(tmp_path / "garbage", prompt_cache=None)


def test_save_load_round_trip_from_every_source(sd3, flux, sd3_unsaved, sd3_bare, tmp_path):
    _, folder, model = sd3
    pipe = sd3_unsaved
    assert "_class_name" not in pipe.transformer.config  # as a user's pipeline object
    sources = {
        "pipeline": pipe,
        "transformer_object": pipe.transformer,
        "pipeline_folder": folder,
        "transformer_folder": folder / "transformer",
    }
    for name, source in sources.items():
        loaded = sd3_bare if name == "transformer_object" else jfd.load(source, prompt_cache=None)
        loaded.save(tmp_path / name)
        back = jfd.load(tmp_path / name)
        assert isinstance(back, jfd.SD3Model)
        _same_leaves(back.transformer, model.transformer)
        assert back.scheduler_config["shift"] == 3.0
        # and a saved folder saved again
        back.save(tmp_path / f"{name}_again")
        _same_leaves(jfd.load(tmp_path / f"{name}_again").transformer, model.transformer)
    assert (tmp_path / "pipeline" / "vae" / "config.json").exists()
    # FLUX, and a folder saved before the class name was written
    flux[2].save(tmp_path / "flux")
    config_file = tmp_path / "flux" / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "_class_name"}))
    back = jfd.load(tmp_path / "flux")
    assert isinstance(back, jfd.FluxModel)
    _same_leaves(back.transformer, flux[2].transformer)


def test_decode_size_follows_the_points(sd3):
    _, _, model = sd3
    z = np.random.default_rng(0).standard_normal(16 * 8 * 8).astype(np.float32)
    model.field(height=64, width=64, max_sequence_length=SEQ)
    assert model.decode(np.stack([z, z])).shape == (2, 64, 64, 3)
    wide = np.zeros(16 * 8 * 16, np.float32)
    assert model.decode(wide, height=64).shape == (64, 128, 3)  # width from the points
    with pytest.raises(ValueError, match="height=.*width="):
        model.decode(np.zeros(16 * 2 * 2, np.float32))  # no field of this size
    # two fields of one latent size, two aspect ratios: ask which
    model.field(height=SIZE, width=SIZE, max_sequence_length=SEQ)
    model.field(height=64, width=256, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="128 x 128.*64 x 256|64 x 256.*128 x 128"):
        model.decode(np.zeros(16 * 16 * 16, np.float32))


def test_loading_a_pipeline_raises_no_diffusers_future_warning(sd3):
    # jaxflow's own from_pretrained call uses the dtype keyword the installed
    # diffusers expects (dtype= from 0.40; torch_dtype= warns there)
    import warnings

    _, folder, _ = sd3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning, module=r"diffusers(\.|$)")
        model = jfd.load(folder, prompt_cache=None)
        assert model.components.pipeline("test").vae is not None
