"""The example scripts' shared command line (examples/_common.py): a bad `--out` is a
one-line message, as the examples' other bad arguments are, not a traceback."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(name):
    """Module `name` of examples/ (imported, not run)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize(
    "where, match",
    [
        ("a_file", "a file, not a folder; pass a folder"),
        (os.path.join("a_file", "below"), "cannot create that folder"),
    ],
)
def test_out_that_cannot_be_a_folder_exits_with_one_line(tmp_path, where, match):
    """`--out` at a file, or under one: SystemExit with a one-line message naming
    `--out` (the script prints it on stderr and exits with code 1)."""
    (tmp_path / "a_file").write_text("not a folder")
    out = str(tmp_path / where)
    with pytest.raises(SystemExit) as exit_:
        _examples("_common").Record("name", out, {})
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"--out {out}: ") and match in message
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_an_examples_main_with_out_at_a_file_exits_before_any_work(tmp_path):
    """As a user meets it: an example's `main` stops at its first step, with the
    message, the file untouched."""
    (tmp_path / "a_file").write_text("not a folder")
    out = str(tmp_path / "a_file")
    with pytest.raises(SystemExit, match="a file, not a folder") as exit_:
        _examples("digits_lyapunov").main(["--quick", "--quiet", "--out", out])
    expected = f"--out {out}: a file, not a folder; pass a folder (created if missing)."
    assert exit_.value.code == expected
    assert (tmp_path / "a_file").read_text() == "not a folder"
