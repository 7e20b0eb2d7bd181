"""Shared plumbing for the example scripts: arguments, JSON records, timing,
progress bars."""

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small settings for tests")
    p.add_argument("--out", default="out", help="output directory (default ./out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars and no training progress (bars show only when stderr is a "
        "terminal and tqdm is installed)",
    )
    return p


def _bar_class(quiet: bool):
    """tqdm's bar class when a bar should show: not `quiet`, stderr a terminal, and
    tqdm importable (an optional dependency, imported here and only here); else None."""
    if quiet:
        return None
    try:
        if sys.stderr is None or not sys.stderr.isatty():
            return None
    except (AttributeError, ValueError):  # a replaced or closed stream
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class _LinesAbove:
    """Stands in for stdout while a bar shows on the same terminal: each complete
    line clears the bar, is written, and the bar is drawn again below it."""

    def __init__(self, stream, bar):
        self._stream, self._bar, self._buf = stream, bar, []

    def write(self, text):
        head, newline, tail = text.rpartition("\n")
        if not newline:
            self._buf.append(text)
            return len(text)
        with self._bar.get_lock():
            self._bar.clear(nolock=True)
            self._stream.write("".join(self._buf) + head + newline)
            self._stream.flush()
            self._bar.refresh(nolock=True)
        self._buf = [tail] if tail else []
        return len(text)

    def flush_rest(self):
        if self._buf:
            self._stream.write("".join(self._buf))
            self._buf = []
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, flush, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def _bar_shown(tqdm, **kwargs):
    """A tqdm bar on stderr; while it is open, lines printed to a stdout on a terminal
    go above it instead of through it."""
    # a fixed size, the terminal's or 80 x 24 where it reports none or zero (a pty
    # whose size was never set), where tqdm's own sizing draws blank lines
    columns, lines = shutil.get_terminal_size()
    with tqdm(file=sys.stderr, ncols=columns, nrows=lines, **kwargs) as bar:
        stdout = sys.stdout
        try:
            wrap = stdout is not None and stdout.isatty()
        except (AttributeError, ValueError):
            wrap = False
        if not wrap:
            yield bar
            return
        sys.stdout = lines = _LinesAbove(stdout, bar)
        try:
            yield bar
        finally:
            lines.flush_rest()
            if sys.stdout is lines:
                sys.stdout = stdout


def progress(iterable, *, total=None, desc=None, quiet=False, unit="it", leave=True):
    """`iterable` with a progress bar and an ETA on stderr (tqdm), when stderr is a
    terminal, tqdm is installed and not `quiet`; otherwise `iterable` itself, so that
    logs, CI and tests see no bar. For the loops that take noticeable time, one
    iteration a solve or a sweep; the loop must finish its work inside the iteration
    (e.g. `np.asarray` on the result) for the bar to mean anything under JAX's
    asynchronous dispatch. `leave=False` clears the bar when the loop ends (for an
    inner loop whose results are printed after it)."""
    tqdm = _bar_class(quiet)
    if tqdm is None:
        return iterable
    return _iterate(tqdm, iterable, dict(total=total, desc=desc, unit=unit, leave=leave))


def _iterate(tqdm, iterable, kwargs):
    with _bar_shown(tqdm, iterable=iterable, **kwargs) as bar:
        yield from bar


def progress_chunks(fn, xs, *, chunk, desc=None, quiet=False):
    """`fn(xs)` for a pytree `xs` of arrays with a leading (points) axis, with a
    progress bar over the points where `progress` would show one: then `fn` runs on
    consecutive slices of `chunk` points, each finished before the bar moves, and the
    results are concatenated; otherwise it is one call, `fn(xs)`.

    Only for an `fn` whose rows do not depend on how the points are split, bit for
    bit: `jax.jit(lambda xs: jf.batch_map(g, xs, batch_size=chunk))` is one (each
    slice is whole batches of `chunk` and the remainder, each batch the same `vmap`
    of the same points as in one call). A plain `vmap` split in chunks is another
    program, and on an accelerator a slower one."""
    tqdm = _bar_class(quiet)
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if tqdm is None or n <= chunk:
        return fn(xs)
    host = jax.tree_util.tree_map(np.asarray, xs)  # slicing on the host compiles nothing
    outs = []
    with _bar_shown(tqdm, total=n, desc=desc, unit="pt") as bar:
        for start in range(0, n, chunk):
            part = jax.tree_util.tree_map(lambda a, s=start: a[s : s + chunk], host)
            outs.append(jax.block_until_ready(fn(part)))
            bar.update(min(chunk, n - start))
    return jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts), *outs)


def _to_json(obj):
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _to_json(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


def make_out(out: str) -> None:
    """Create the `--out` folder `out` (and its parents) if it is missing, or exit
    with a one-line message, as for the examples' other bad arguments, when it
    cannot be: a file there, a parent that is a file, no permission."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out}: a file, not a folder; pass a folder (created if missing).")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise SystemExit(
            f"--out {out}: cannot create that folder ({error.strerror or error}); pass a "
            "folder that can be written."
        ) from None


class Record:
    """Collects settings and results; writes `<name>.json` beside the PNG. Made
    before any computation, by every example: it creates the `--out` folder."""

    def __init__(self, name: str, out: str, settings: dict):
        self.name = name
        self.out = out
        make_out(out)
        self.start = time.perf_counter()
        self.data = {
            "settings": settings,
            "environment": {
                "jax_version": jax.__version__,
                "backend": jax.default_backend(),
                "x64": bool(jax.config.jax_enable_x64),
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
            },
            "results": {},
        }

    def png_path(self) -> str:
        return os.path.join(self.out, f"{self.name}.png")

    def write(self, results: dict) -> str:
        self.data["results"] = results
        self.data["wall_time_s"] = time.perf_counter() - self.start
        path = os.path.join(self.out, f"{self.name}.json")
        with open(path, "w") as f:
            json.dump(_to_json(self.data), f, indent=1)
        return path


def final_loss(result, last: int = 100):
    """Mean loss of the last `last` steps a `jf.train` call ran, or None when it
    ran none (the weights came from the cache)."""
    tail = np.asarray(result.losses)[-last:]
    return float(tail.mean()) if tail.size else None
