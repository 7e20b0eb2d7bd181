"""Paper 000 appendix E.2 / F on Stable Diffusion 3.5 and FLUX: reconstruction error
against the instability of generation, image by image.

For each image, with the null prompt "" and the pipeline's own time grid:

1. VAE-encode to latents x; invert the PF-ODE, zhat = Ghat^{-1}(x) (Euler, or
   diffusers' Heun with --solver heun); regenerate, xhat = Ghat(zhat); decode.
2. R(x) = |x - xhat| / sqrt(n) in latent space (paper 000 eq. 4), and the PSNR of
   the decoded reconstruction against the image (and of the VAE alone, its floor).
3. At zhat: the paper's finite-difference estimate E_fd = |Ghat(zhat + n) - xhat| / |n|,
   |n| = fd_eps |zhat|, and the exact E_jvp = |J_G(zhat) u| / |u| by one JVP through
   the whole generation solve, u = n / |n| (one direction for both); and the top-k
   finite-time Lyapunov exponents (per step) of generation, the step map being one
   solver step on the grid.
4. Pearson and Spearman correlations of log R with log E (bootstrap intervals), a
   scatter (Fig. 4(c) / A1) and the worst reconstructions beside their originals
   (Figs. A2 / A3).

The images are --images FOLDER (PNG / JPEG), or by default the photographs that
ship inside scikit-learn (china, flower) and scikit-image (astronaut, coffee,
chelsea, rocket, immunohistochemistry, hubble_deep_field); crops and flips of
them make up N. They are NOT the paper's COCO images.

    python examples/large_model_reconstruction.py \\
        --model stabilityai/stable-diffusion-3.5-medium --dtype bfloat16

Each image's record goes to out/large_model_reconstruction.jsonl as soon as it is
done (a header line with the settings first); a rerun with the same settings
continues where the last one stopped. Batches of --batch images are sharded over
every local device; --distributed runs one process per host. At the end:
out/large_model_reconstruction.json and .png. See docs/large_model_study.md.
"""

import glob
import json
import os
import shutil
import tempfile
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.ticker
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import Record, parser, progress  # noqa: E402
from _stats import correlations  # noqa: E402
from PIL import Image  # noqa: E402

import jaxflow as jf  # noqa: E402
import jaxflow.diffusers as jfd  # noqa: E402

NAME = "large_model_reconstruction"
TINY = {"sd3-tiny": "sd3", "flux-tiny": "flux"}
TINY_SEQUENCE = 16  # the tiny pipelines' tokenizers hold 16 tokens
# Settings that change no record: a rerun may change them and still continue.
FREE = ("num_images", "batch", "distributed", "quick")
SKIMAGE_PHOTOGRAPHS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
)
THUMB = 256  # pixels of the saved thumbnails (the gallery needs no full images)


# ---- images -------------------------------------------------------------------


def image_sources(folder):
    """(name, loader) of every source photograph: a folder's PNG / JPEG files, or
    sklearn's (and scikit-image's, where installed) sample photographs."""
    if folder is not None:
        files = sorted(
            f
            for ext in ("png", "jpg", "jpeg", "PNG", "JPG", "JPEG")
            for f in glob.glob(os.path.join(folder, f"*.{ext}"))
        )
        if not files:
            raise SystemExit(f"--images {folder}: no PNG or JPEG files there.")
        return [
            (os.path.basename(f), lambda f=f: np.asarray(Image.open(f).convert("RGB")))
            for f in files
        ]
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    sources = [
        (os.path.basename(f), lambda a=a: a)
        for f, a in zip(sample.filenames, sample.images, strict=True)
    ]
    try:
        from skimage import data
    except ImportError:
        print("no scikit-image: sklearn's two photographs only (pip install scikit-image)")
        return sources
    # the colour photographs that ship inside scikit-image (none is downloaded)
    for name in SKIMAGE_PHOTOGRAPHS:
        sources.append((name, lambda name=name: np.asarray(getattr(data, name)())))
    return sources


def image(sources, index, size, seed):
    """Image `index`: source `index % S`, at variant `index // S` (0: the centre
    crop; then random square crops of 50-90% of the short side, every other one
    mirrored), resized to `size` x `size`, float32 in [0, 1]."""
    name, load = sources[index % len(sources)]
    variant = index // len(sources)
    array = load()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    array = array[..., :3]
    h, w = array.shape[:2]
    if variant == 0:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
    else:
        rng = np.random.default_rng([seed, index])
        side = int(min(h, w) * rng.uniform(0.5, 0.9))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(array[top : top + side, left : left + side].astype(np.uint8))
    crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    out = np.asarray(crop, np.float32) / 255.0
    if variant % 2 == 1:
        out = out[:, ::-1]
    return f"{name}#{variant}", np.ascontiguousarray(out)


# ---- the JSONL store --------------------------------------------------------------


def read_records(out, header):
    """Records already written under `out` (every process's file), after checking
    that their header's settings are `header`'s; a line cut short by a crash is
    dropped."""
    done = {}
    for path in sorted(glob.glob(os.path.join(out, f"{NAME}*.jsonl"))):
        with open(path) as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if number == 0:
                theirs = entry.get("header", {})
                differ = sorted(
                    k
                    for k in set(theirs) | set(header)
                    if k not in FREE and theirs.get(k) != header.get(k)
                )
                if differ:
                    shown = ", ".join(
                        f"{k}: {theirs.get(k)!r} there, {header.get(k)!r} now" for k in differ
                    )
                    raise SystemExit(
                        f"{path} holds a study with other settings ({shown}); pass a new "
                        "--out for this one (records of two studies are never mixed)."
                    )
            elif "index" in entry:
                done[entry["index"]] = entry
    return done


def append(path, entry):
    # one line, flushed and synced, so that a killed run loses at most the batch
    # in flight
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_partial_line(path):
    """Repair the JSONL file `path` before anything is appended to it: a run killed
    while writing a record leaves its last line without a newline, and the next
    record appended would be glued to that fragment (both lost, the image redone on
    every rerun). A fragment is cut off, after being appended (with a newline) to
    `<path>.dropped`, and a warning says so; a last line that is a whole JSON object
    lacking only its newline (the kill came between the two) is kept, and given it.

    **Returns:** the bytes cut off, `b""` when there were none (no file, an empty
    one, or one ending in a newline)."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return b""
    with f:
        data = f.read()  # a record a line: the whole study is a few hundred kB
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        if not tail:
            return b""
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:  # JSONDecodeError, or a UnicodeDecodeError mid-character
            whole = False
        if whole:
            f.write(b"\n")
        else:
            # the copy first, synced: a kill between the two leaves the fragment in
            # both files, never in neither
            with open(f"{path}.dropped", "ab") as copy:
                copy.write(tail + b"\n")
                copy.flush()
                os.fsync(copy.fileno())
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    if whole:
        return b""
    warnings.warn(
        f"{path} ended in a partial record ({len(tail)} bytes, cut short by a killed "
        f"run): removed (kept in {path}.dropped), so that the records appended after it "
        "stay readable; its image counts as not done.",
        stacklevel=2,
    )
    return tail


def open_store(out, jsonl, settings):
    """The records already written under `out` (`read_records`), after repairing
    this process's file `jsonl` (`drop_partial_line`) and starting it with a header
    line if it has none."""
    drop_partial_line(jsonl)
    done = read_records(out, settings)
    if not os.path.exists(jsonl) or os.path.getsize(jsonl) == 0:  # new, or its header cut
        append(jsonl, {"header": settings})
    return done


# ---- the study of one image, batched ----------------------------------------------


def solver_step(field, sigmas, heun):
    """Step `i` of the generation solve on the decreasing grid `sigmas`, as the
    solver takes it: `step(z, i)`, the map whose Lyapunov exponents are reported."""

    def step(z, i):
        s0, s1 = sigmas[i], sigmas[i + 1]
        k0 = (s1 - s0) * field.velocity(z, s0)
        euler = z + k0
        if not heun:
            return euler
        # FlowMatchHeun: the trapezoid, but a step ending at sigma = 0 is Euler
        return jax.lax.cond(
            s1 == 0,
            lambda: euler,
            lambda: z + 0.5 * (k0 + (s1 - s0) * field.velocity(euler, s1)),
        )

    return step


def make_study(times, solver, top_k, fd_eps, singular_values=0):
    """The per-image computation, vmapped: the field is an argument of the
    compiled function (closed over, its weights would become constants)."""
    sigmas = times[::-1]  # generation walks the grid from the noise end
    steps = int(times.shape[0]) - 1
    heun = solver == "heun"
    ode_solver = jfd.FlowMatchHeun() if heun else "euler"
    kw = dict(solver=ode_solver, times=times, throw=False)

    def one(field, x, u, key):
        inverted = jf.invert(field, x, **kw)
        # a failed point is NaN; continue from x so that the checks of the later
        # stages pass and the failure is reported, not raised for the whole batch
        zhat = jnp.where(inverted.ok, inverted.value, x)
        regenerated = jf.generate(field, zhat, **kw)
        xhat = regenerated.value
        r = jnp.linalg.norm(x - xhat) / jnp.sqrt(x.size)
        n = fd_eps * jnp.linalg.norm(zhat) * u
        perturbed = jf.generate(field, zhat + n, **kw)
        e_fd = jnp.linalg.norm(perturbed.value - xhat) / jnp.linalg.norm(n)
        e_jvp = jf.intrinsic_instability(lambda z: jf.generate(field, z, **kw).value, zhat, u)

        spectrum = jf.lyapunov_spectrum_of_map(
            solver_step(field, sigmas, heun),
            zhat,
            steps,
            k=top_k,
            key=key,
            save_stretch=False,
            throw=False,
        )
        results = (inverted.result, regenerated.result, perturbed.result, spectrum.result)
        out = dict(
            xhat=xhat,
            R=r,
            E_fd=e_fd,
            E_jvp=e_jvp,
            exponents=spectrum.value.exponents,
            results=results,
        )
        if singular_values:
            # the directions G amplifies most, and by how much: s_1 = max_u E(zhat, u)
            triplets = jf.top_singular_values(
                jf.generation_map(field, solver=ode_solver, times=times),
                zhat,
                singular_values,
                key=jax.random.fold_in(key, 1),
            )
            out.update(
                singular_values=triplets.values,
                singular_residuals=triplets.residuals,
                singular_converged=triplets.converged,
            )
        return out

    return eqx.filter_jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


STAGES = ("invert", "regenerate", "perturbed generate", "lyapunov")


def singular_entry(res, j):
    if "singular_values" not in res:
        return {}
    return dict(
        singular_values=[float(v) for v in res["singular_values"][j]],
        singular_residuals=[float(v) for v in res["singular_residuals"][j]],
        singular_converged=bool(np.all(res["singular_converged"][j])),
    )


def psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def thumbnail(array):
    img = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    if img.size[0] > THUMB:
        img = img.resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    return np.asarray(img)


# ---- the model --------------------------------------------------------------------


def load_model(args, dtype, tmp):
    if args.model in TINY:
        # the real loading path: a pipeline saved with save_pretrained, read by jfd.load
        folder = os.path.join(tmp, args.model)
        jfd.tiny_pipeline(TINY[args.model], seed=0).save_pretrained(folder)
        return jfd.load(folder, dtype=dtype, prompt_cache=None)
    return jfd.load(args.model, dtype=dtype)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument(
        "--model",
        default=None,
        help="hub id, pipeline folder, model.save folder, or sd3-tiny / flux-tiny "
        "(default stabilityai/stable-diffusion-3.5-medium; sd3-tiny with --quick)",
    )
    p.add_argument("--images", default=None, help="a folder of PNG / JPEG images")
    p.add_argument("--num-images", type=int, default=None, help="N images (100; 4 quick)")
    p.add_argument("--size", type=int, default=None, help="pixels a side (1024; 64 quick)")
    p.add_argument("--steps", type=int, default=None, help="steps each way (500; 8 quick)")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler")
    p.add_argument("--fd-eps", type=float, default=1e-3, help="|n| / |zhat| for E_fd")
    p.add_argument("--top-k", type=int, default=None, help="Lyapunov exponents (4; 2 quick)")
    p.add_argument(
        "--singular-values",
        type=int,
        default=None,
        help="also the top k singular values of J_G at the inverted noise, matrix-free "
        "(block Lanczos from JVPs and VJPs through the solve); 0: none (default; 2 quick)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens")
    p.add_argument("--batch", type=int, default=None, help="images a batch (local devices)")
    p.add_argument(
        "--devices", type=int, default=None, help="use the first N local devices (default all)"
    )
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (1000)")
    p.add_argument("--gallery", type=int, default=6, help="worst reconstructions shown")
    args = p.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    args.model = args.model or (
        "sd3-tiny" if args.quick else "stabilityai/stable-diffusion-3.5-medium"
    )
    num = args.num_images or (4 if args.quick else 100)
    size = args.size or (64 if args.quick else 1024)
    steps = args.steps or (8 if args.quick else 500)
    top_k = args.top_k or (2 if args.quick else 4)
    if args.singular_values is None:
        args.singular_values = 2 if args.quick else 0
    seq = args.max_sequence_length or (TINY_SEQUENCE if args.model in TINY else None)
    resamples = args.bootstrap or (200 if args.quick else 1000)
    devices = jax.local_devices()
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            raise SystemExit(f"--devices {args.devices}: this host has {len(devices)}.")
        devices = devices[: args.devices]
    batch = args.batch or len(devices)
    if batch % len(devices):
        raise SystemExit(f"--batch {batch} must be a multiple of the {len(devices)} local devices.")
    process, processes = jax.process_index(), jax.process_count()

    sources = image_sources(args.images)
    names = [name for name, _ in sources]
    settings = dict(
        model=args.model,
        images=args.images or "sample photographs, crops and flips: " + ", ".join(names),
        size=size,
        steps=steps,
        solver=args.solver,
        prompt="",
        max_sequence_length=seq,
        fd_eps=args.fd_eps,
        fd_eps_meaning="|n| = fd_eps |zhat|, n = |n| u, u uniform on the sphere",
        top_k=top_k,
        singular_values=args.singular_values,
        dtype=args.dtype,
        seed=args.seed,
        num_images=num,
        batch=batch,
        distributed=args.distributed,
        quick=args.quick,
    )
    rec = Record(NAME, args.out, settings)
    out = args.out
    suffix = f".p{process}" if processes > 1 else ""
    jsonl = os.path.join(out, f"{NAME}{suffix}.jsonl")
    thumbs = os.path.join(out, f"{NAME}_images")
    os.makedirs(thumbs, exist_ok=True)
    done = open_store(out, jsonl, settings)
    mine = [i for i in range(process, num, processes)]
    todo = [i for i in mine if i not in done]
    skipped = len(mine) - len(todo)
    print(
        f"{args.model}, {size}x{size}, {steps} {args.solver} steps: {len(todo)} of {len(mine)} "
        f"images to do ({skipped} already recorded), batches of {batch} on {len(devices)} "
        f"device(s), process {process} of {processes}",
        flush=True,
    )
    computed = 0
    if todo:
        tmp = tempfile.mkdtemp()
        try:
            computed = run(
                args,
                rec,
                todo,
                sources,
                size,
                steps,
                top_k,
                seq,
                batch,
                devices,
                jsonl,
                thumbs,
                tmp,
                done,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"{NAME} done")
        if process != 0:
            return None
        done = read_records(out, settings)
        merged = os.path.join(out, f"{NAME}.jsonl")
        with open(merged + ".tmp", "w") as f:
            f.write(json.dumps({"header": settings}) + "\n")
            for i in sorted(done):
                f.write(json.dumps(done[i]) + "\n")
        os.replace(merged + ".tmp", merged)
    records = [done[i] for i in sorted(done) if i < num]
    results = summarise(records, args, resamples, skipped, computed)
    plot(rec, records, thumbs, args, steps, size)
    path = rec.write(results)
    print(f"wrote {rec.png_path()} and {path} in {rec.data['wall_time_s']:.1f} s")
    return results


def run(
    args, rec, todo, sources, size, steps, top_k, seq, batch, devices, jsonl, thumbs, tmp, done
):
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = load_model(args, dtype, tmp)
    field = model.field("", height=size, width=size, max_sequence_length=seq)
    times = model.times(steps, height=size, width=size)
    study = make_study(times, args.solver, top_k, args.fd_eps, args.singular_values)
    mesh = Mesh(np.asarray(devices), ("batch",))
    sharded, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    field = jax.tree.map(lambda a: jax.device_put(a, replicated) if eqx.is_array(a) else a, field)
    batches = [todo[s : s + batch] for s in range(0, len(todo), batch)]
    computed = 0
    for indices in progress(
        batches, desc=f"images, batches of {batch}", quiet=args.quiet, unit="batch"
    ):
        start = time.perf_counter()
        names, images = zip(*(image(sources, i, size, args.seed) for i in indices), strict=True)
        images = np.stack(images)
        entries = [dict(index=i, id=name) for i, name in zip(indices, names, strict=True)]
        try:
            x = np.asarray(model.encode(images))
            encode_s = time.perf_counter() - start
            n = x.shape[1]
            # one direction and one Lyapunov frame per image, from (seed, index):
            # the same whatever the batch, the devices or the process
            keys = [jax.random.fold_in(jax.random.key(args.seed), i) for i in indices]
            u = np.stack([np.asarray(jax.random.normal(k, (n,), jnp.float32)) for k in keys])
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            frames = np.stack(
                [np.asarray(jax.random.key_data(jax.random.split(k)[1])) for k in keys]
            )
            pad = batch - len(indices)  # a short last batch is padded to the mesh
            padded = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (x, u, frames)]
            xs, us, ks = (jax.device_put(a, sharded) for a in padded)
            t0 = time.perf_counter()
            res = study(field, xs, us, jax.random.wrap_key_data(ks))
            real = len(indices)
            messages = [jf.result_messages(r)[:real] for r in res.pop("results")]
            res = {k: np.array(v)[:real] for k, v in res.items()}  # writable, for torch
            solve_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            recon = model.decode(res["xhat"], height=size, width=size)
            vae_only = model.decode(x, height=size, width=size)
            decode_s = time.perf_counter() - t0
            for j, entry in enumerate(entries):
                errors = {
                    stage: stage_messages[j]
                    for stage, stage_messages in zip(STAGES, messages, strict=True)
                    if stage_messages[j]
                }
                entry.update(
                    ok=not errors,
                    errors=errors,
                    R=float(res["R"][j]),
                    PSNR=psnr(images[j], recon[j]),
                    PSNR_vae_only=psnr(images[j], vae_only[j]),
                    E_fd=float(res["E_fd"][j]),
                    E_jvp=float(res["E_jvp"][j]),
                    exponents=[float(v) for v in res["exponents"][j]],
                    **singular_entry(res, j),
                    seconds=dict(
                        encode=encode_s / len(indices),
                        solves=solve_s / len(indices),
                        decode=decode_s / len(indices),
                        batch_wall=time.perf_counter() - start,
                    ),
                )
                pair = np.concatenate([thumbnail(images[j]), thumbnail(recon[j])], axis=1)
                Image.fromarray(pair).save(os.path.join(thumbs, f"{entry['index']:06d}.png"))
        except Exception as error:  # noqa: BLE001 -- record it, go on with the next batch
            for entry in entries:
                entry.update(ok=False, errors={"batch": f"{type(error).__name__}: {error}"})
        for entry in entries:
            append(jsonl, entry)
            done[entry["index"]] = entry
            computed += 1
    return computed


def summarise(records, args, resamples, skipped, computed):
    good = [
        r
        for r in records
        if r.get("ok") and all(np.isfinite([r["R"], r["E_fd"], r["E_jvp"]])) and r["R"] > 0
    ]
    results = dict(
        images=len(records),
        ok=len(good),
        failed=[
            dict(index=r["index"], id=r["id"], errors=r["errors"]) for r in records if r not in good
        ],
        skipped_already_recorded=skipped,
        computed_this_run=computed,
        per_image=records,
    )
    if not good:
        print("no image succeeded: nothing to summarise")
        return results
    r = np.array([g["R"] for g in good])
    e_fd = np.array([g["E_fd"] for g in good])
    e_jvp = np.array([g["E_jvp"] for g in good])
    exps = np.array([g["exponents"] for g in good])
    psnrs = np.array([g["PSNR"] for g in good])
    rel = np.abs(e_fd / e_jvp - 1)
    results.update(
        median_R=float(np.median(r)),
        max_R=float(np.max(r)),
        median_PSNR=float(np.median(psnrs)),
        median_PSNR_vae_only=float(np.median([g["PSNR_vae_only"] for g in good])),
        E_fd_vs_E_jvp=dict(median_rel_diff=float(np.median(rel)), max_rel_diff=float(np.max(rel))),
        fraction_E_gt_1=float(np.mean(e_jvp > 1)),
        exponents_median=np.median(exps, 0).tolist(),
        exponents_min=exps.min(0).tolist(),
        exponents_max=exps.max(0).tolist(),
    )
    if len(good) >= 4:  # the Fisher-z p-value needs n > 3
        rng = np.random.default_rng(args.seed)
        with np.errstate(all="ignore"):  # tiny resamples can be constant
            results["correlations_of_logs"] = {
                "R_vs_E_jvp": correlations(np.log(e_jvp), np.log(r), rng, resamples),
                "R_vs_E_fd": correlations(np.log(e_fd), np.log(r), rng, resamples),
            }
    print(
        f"{len(good)} of {len(records)} images ok: median R {np.median(r):.3g} "
        f"(max {r.max():.3g}), median PSNR {np.median(psnrs):.2f} dB "
        f"(VAE alone {results['median_PSNR_vae_only']:.2f} dB)"
    )
    if "correlations_of_logs" in results:
        s = results["correlations_of_logs"]["R_vs_E_jvp"]
        print(
            f"log R vs log E_jvp: Pearson {s['pearson']['r']:.3f} (95% CI "
            f"{np.round(s['pearson']['bootstrap_95'], 3).tolist()}, "
            f"p = {s['pearson']['p_value']:.2g}), "
            f"Spearman {s['spearman']['r']:.3f} (p = {s['spearman']['p_value']:.2g})"
        )
    print(
        f"E_fd vs E_jvp: median relative difference {np.median(rel):.2g} (max {rel.max():.2g}); "
        f"median E_jvp {np.median(e_jvp):.3g}, fraction E > 1: {np.mean(e_jvp > 1):.2f}"
    )
    median = np.round(np.median(exps, 0), 4).tolist()
    print(f"top-{exps.shape[1]} Lyapunov exponents per step (median over images): {median}")
    if good[0].get("singular_values"):
        s = np.array([g["singular_values"] for g in good])
        # E_jvp is |J u| for one unit u: never above the largest singular value
        bounded = bool(np.all(e_jvp <= s[:, 0] * (1 + 1e-3)))
        results.update(
            singular_values_median=np.median(s, 0).tolist(),
            singular_converged=int(sum(g["singular_converged"] for g in good)),
            E_jvp_below_s1=bounded,
        )
        print(
            f"top-{s.shape[1]} singular values of J_G (median over images): "
            f"{np.round(np.median(s, 0), 4).tolist()}; converged for "
            f"{results['singular_converged']} of {len(good)}; E_jvp <= s_1 for every image: "
            f"{bounded}"
        )
    return results


def _log_axes(ax):
    # a narrow log range shows only minor ticks: label them plainly, x labels tilted
    # so that they do not overlap
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.4g"))
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.4g"))
    ax.tick_params(axis="x", which="both", labelrotation=45, labelsize=7)
    ax.tick_params(axis="y", which="both", labelsize=7)


def plot(rec, records, thumbs, args, steps, size):
    good = [r for r in records if r.get("ok") and np.isfinite(r["R"]) and r["R"] > 0]
    worst = sorted(good, key=lambda g: -g["R"])[: args.gallery]
    fig = plt.figure(figsize=(16, 9.5))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.3, 1])
    axes = top.subplots(1, 3)
    if good:
        r = np.array([g["R"] for g in good])
        e_jvp = np.array([g["E_jvp"] for g in good])
        e_fd = np.array([g["E_fd"] for g in good])
        ax = axes[0]
        ax.scatter(e_jvp, r, s=14, label="$\\mathcal{E}$ by JVP")
        ax.scatter(e_fd, r, s=14, marker="x", label="finite difference")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="$\\mathcal{E}_G(\\hat z, u)$",
            ylabel="$\\mathcal{R}(x)$ (latent, eq. 4)",
            title="(a) reconstruction error vs instability",
        )
        ax.legend(fontsize=8)
        ax = axes[1]
        ax.scatter(e_jvp, e_fd, s=14)
        lim = [min(e_jvp.min(), e_fd.min()), max(e_jvp.max(), e_fd.max())]
        ax.plot(lim, lim, color="grey", lw=0.8, label="equality")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="exact, one JVP through the solve",
            ylabel=f"finite difference, |n| = {args.fd_eps:g} |z|",
            title="(b) the paper's estimate vs the exact coefficient",
        )
        ax.legend(fontsize=8)
        for ax in axes[:2]:
            _log_axes(ax)
        exps = np.array([g["exponents"] for g in good])
        axes[2].boxplot([exps[:, i] for i in range(exps.shape[1])])
        axes[2].axhline(0.0, color="grey", lw=0.8, ls="--")
        axes[2].set(
            xlabel="exponent index",
            ylabel="per step",
            title=f"(c) top-{exps.shape[1]} finite-time Lyapunov exponents",
        )
    if worst:
        for ax, g in zip(np.atleast_1d(bottom.subplots(1, len(worst))), worst, strict=True):
            path = os.path.join(thumbs, f"{g['index']:06d}.png")
            if os.path.exists(path):
                ax.imshow(np.asarray(Image.open(path)))
            ax.set_title(
                f"{g['id']}: R {g['R']:.3g}, E {g['E_jvp']:.3g}\n"
                f"PSNR {g['PSNR']:.1f} dB (VAE alone {g['PSNR_vae_only']:.1f})",
                fontsize=8,
            )
            ax.axis("off")
        bottom.suptitle("worst reconstructions: original | reconstruction", fontsize=10)
    top.suptitle(
        f"{args.model}: {len(good)} images at {size}x{size}, {steps} {args.solver} steps each "
        "way, null prompt (not the paper's COCO images)",
        fontsize=11,
    )
    fig.savefig(rec.png_path(), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
