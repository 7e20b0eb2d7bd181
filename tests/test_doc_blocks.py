"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs as a reader would run it: alone, in a fresh interpreter (so that
`jf.use_cpu_devices()` comes before JAX starts), in an empty directory. A block that
cannot run here (a download, a real checkpoint, a GPU) is marked by an HTML comment,
invisible on GitHub and in the docs site, on the line right before its fence:

    <!-- doc-test: skip (needs the SD3.5 Medium checkpoint from the Hugging Face hub) -->

and is skipped with that reason; `<!-- doc-test: slow -->` there marks a block that
takes more than about 20 seconds with the `slow` marker. Any other `doc-test` comment
is an error.

The blocks run with XLA's backend optimisations off (`_FAST_COMPILE`): nearly all of
their time is XLA compiling one program per call, which this cuts by about a quarter,
and no block's numbers are checked, only that it runs.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# at least this many blocks per page: the extractor must not silently find none
EXPECTED = {
    "README.md": 2,
    "docs/index.md": 1,
    "docs/batching.md": 1,
    "docs/matrix_free.md": 1,
    "docs/diffusers.md": 1,
}
TIMEOUT = {False: 150, True: 600}  # seconds, for a block and a slow one: 5-6x their time

# faster compiles, the same programs: the blocks are short runs dominated by compilation
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

_FENCE = re.compile(r"(\s*)```(?:python|py)\s*")
_CLOSE = re.compile(r"\s*```\s*")
_MARKER = re.compile(r"\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*")
_SKIP = re.compile(r"skip \((.+)\)")


def _marker(page: pathlib.Path, lines: list[str], fence: int) -> tuple[str | None, bool]:
    """`(skip reason or None, slow)` from the marker on the line before `fence`."""
    marker = _MARKER.fullmatch(lines[fence - 1]) if fence > 0 else None
    if marker is None:
        return None, False
    if marker.group(1) == "slow":
        return None, True
    skip = _SKIP.fullmatch(marker.group(1))
    if skip is None:
        raise ValueError(
            f"{page.name}:{fence}: unknown marker {lines[fence - 1].strip()!r}; use "
            "<!-- doc-test: skip (reason) --> or <!-- doc-test: slow -->."
        )
    return skip.group(1), False


def _blocks(page: pathlib.Path) -> list[tuple[int, str, str | None, bool]]:
    """`(line, code, skip reason or None, slow)` of each python block of `page`."""
    lines = page.read_text().splitlines()
    found, marked = [], set()
    i = 0
    while i < len(lines):
        fence = _FENCE.fullmatch(lines[i])
        if fence is None:
            i += 1
            continue
        start, indent = i, fence.group(1)
        i += 1
        while i < len(lines) and _CLOSE.fullmatch(lines[i]) is None:
            i += 1
        if i == len(lines):
            raise ValueError(f"{page.name}:{start + 1}: a ```python block without its end.")
        code = "\n".join(line.removeprefix(indent) for line in lines[start + 1 : i]) + "\n"
        marked.add(start - 1)
        found.append((start + 1, code, *_marker(page, lines, start)))
        i += 1
    stray = [k + 1 for k, line in enumerate(lines) if _MARKER.fullmatch(line) and k not in marked]
    if stray:
        raise ValueError(
            f"{page.name}: a doc-test marker not on the line right before a ```python "
            f"fence, at line {', '.join(map(str, stray))}."
        )
    return found


def _params():
    params = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for number, (line, code, skip, slow) in enumerate(_blocks(page), 1):
            marks = [pytest.mark.slow] if slow and skip is None else []
            params.append(
                pytest.param(name, line, code, skip, slow, id=f"{name}:{number}", marks=marks)
            )
    return params


def test_blocks_found():
    counts = {page: 0 for page in EXPECTED}
    for param in _params():
        counts[param.values[0]] = counts.get(param.values[0], 0) + 1
    short = {page: counts[page] for page, least in EXPECTED.items() if counts[page] < least}
    assert not short, f"fewer ```python blocks than expected (expected {EXPECTED}): {short}"


@pytest.mark.timeout(660)  # about 5x its idle time on 2 cores
@pytest.mark.parametrize("page, line, code, skip, slow", _params())
def test_block_runs(page, line, code, skip, slow, tmp_path):
    if skip is not None:
        pytest.skip(skip)
    script = tmp_path / "block.py"
    script.write_text(code)
    try:
        done = subprocess.run(
            [sys.executable, script.name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT[slow],
            env={**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}"},
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"the block at {page}:{line} ran past {e.timeout} s:\n{stderr}")
    if done.returncode != 0:
        pytest.fail(
            f"the block at {page}:{line} failed (exit {done.returncode}); block.py line k is "
            f"{page} line {line} + k:\n{done.stderr}"
        )
