"""The API reference documents every public name once (`mkdocs build --strict`
catches broken references, not missing ones)."""

import collections
import inspect
import pathlib
import re
import types

import jaxflow as jf
import jaxflow.diffusers as jfd

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api"


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
