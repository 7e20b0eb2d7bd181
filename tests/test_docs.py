"""The API reference documents every public name once (`mkdocs build --strict`
catches broken references, not missing ones), and the mathematics pages are
LaTeX rendered by arithmatex and MathJax, not ASCII in code spans."""

import collections
import inspect
import pathlib
import re
import types

import pytest

import jaxflow as jf
import jaxflow.diffusers as jfd

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "api"


def _public(module, prefix, defined_in=None):
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if defined_in is not None and getattr(value, "__module__", None) != defined_in:
            continue
        if defined_in is not None and not (inspect.isfunction(value) or inspect.isclass(value)):
            continue
        names.append(prefix + name)
    return names


def test_every_public_name_is_documented_once():
    public = (
        _public(jf, "jaxflow.")
        + _public(jf.nn, "jaxflow.nn.")
        + _public(jf.data, "jaxflow.data.", defined_in="jaxflow.data")
        + _public(jfd, "jaxflow.diffusers.")
    )
    seen = collections.defaultdict(list)
    for page in DOCS.glob("*.md"):
        for match in re.finditer(r"^::: (\S+)", page.read_text(), re.M):
            seen[match.group(1)].append(page.name)
    missing = sorted(set(public) - set(seen))
    twice = {name: pages for name, pages in seen.items() if len(pages) > 1}
    unknown = sorted(set(seen) - set(public) - {"jaxflow.nn", "jaxflow.data", "jaxflow.diffusers"})
    assert not missing, f"public names without an API entry in docs/api: {missing}"
    assert not twice, f"documented on several pages: {twice}"
    assert not unknown, f"API entries for names that are not public: {unknown}"


# the pages whose formulas are LaTeX ($...$, $$...$$), rendered by MathJax
MATH_PAGES = ["mathematics.md", "paper_000.md", "paper_002.md", "paper_003.md"]
# what an ASCII formula in a code span looks like: a Greek letter or sqrt spelled
# out, a hat or bar name, a power, an arrow, a comparison, "~" or a norm's bars.
# Code spans for code (Python names, calls, CLI flags, paths) have none of these.
_ASCII_MATH = re.compile(
    r"\b(alpha|abar|beta|sigma|lambda|delta|eps|pi|mu|xi|chi|sqrt|Ebar|x0_bar"
    r"|[A-Za-z]hat)\b|\^|->|<=|>=| ~ |\|"
)
# the one place that shows the docstrings' plain-text notation on purpose
_ASCII_ON_PURPOSE = {"alpha'", "|u|"}


def test_mathematics_is_latex_rendered_by_mathjax():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    extensions = {
        next(iter(e)) if isinstance(e, dict) else e: e for e in config["markdown_extensions"]
    }
    assert extensions["pymdownx.arithmatex"]["pymdownx.arithmatex"] == {"generic": True}
    scripts = config["extra_javascript"]
    assert "javascripts/mathjax.js" in scripts and (ROOT / "docs/javascripts/mathjax.js").is_file()
    assert any("mathjax@3" in script for script in scripts)
    for name in MATH_PAGES:
        text = (ROOT / "docs" / name).read_text()
        text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # fenced code (bash)
        ascii_math = [
            span
            for span in re.findall(r"`([^`\n]+)`", text)
            if _ASCII_MATH.search(span) and span not in _ASCII_ON_PURPOSE
        ]
        assert not ascii_math, f"docs/{name}: write these formulas in LaTeX: {ascii_math}"
        assert "$" in text, f"docs/{name} has no LaTeX"


def test_docs_cite_papers_without_paths_a_clone_lacks():
    # The papers live outside the repository (../shared/papers on the machine the
    # docs were written on); a clone has no such folder, so pages cite them by
    # title and authors through docs/references.md instead.
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    offending = [
        f"{page.relative_to(ROOT)}:{number}"
        for page in pages
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if "../shared" in line or "shared/papers" in line
    ]
    assert not offending, f"cite the paper via docs/references.md instead: {offending}"
    references = (ROOT / "docs" / "references.md").read_text()
    for number in ("000", "001", "002", "003"):
        assert f"{{#paper-{number}}}" in references
    assert "references.md" in (ROOT / "README.md").read_text()
