"""An adversarial probe of jaxflow's public API (issue 12, "a core that never lies").

Every case is a small snippet run in its own Python process (with a timeout, on
the CPU) against one checkout of jaxflow. A case declares what a correct library
does with its input: raise (`expect="error"`, optionally naming the fix in its
message, `fix=` regex) or return a value that passes a check (`expect="value"`);
for a few edge inputs where both are right, either (`expect="either"`). Each
run is classified as

- clear: an expected error whose message names the problem and the fix (the
  `fix=` regex matches; without one, jaxflow's own code raised it: a `raise` in
  the `jaxflow` package, or a runtime error carrying a jaxflow-written message);
- cryptic: any other error, including an error where a value was expected
  (noted as a false alarm);
- silent: no error where one was expected, or a value failing its check;
- hang: the process ran past its timeout;
- ok: the expected value, correct.

Usage: `python tools/probe.py [--tree PATH] [--only REGEX] [--jobs N]
[--timeout S] [--json OUT] [--markdown OUT]`; see tools/README.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OUTCOMES = ("clear", "ok", "cryptic", "silent", "hang")
MARK = "@@PROBE@@"

# ---------------------------------------------------------------------------
# What every snippet sees: imports, small laws and fields, closed forms.
# ---------------------------------------------------------------------------

PRELUDE = r'''
import math, os, sys, json, warnings
import numpy as np
import jax
import jax.numpy as jnp
import equinox as eqx
import diffrax
import jaxflow as jf

KEY = jax.random.key(0)
RF = jf.RectifiedFlow()
MEAN = np.array([1.0, -1.0])
VAR = np.array([4.0, 0.25])
MU2 = [[-1.0, 0.0], [1.0, 0.0]]
COV2 = [0.2, 0.5]
X2 = jnp.array([0.3, -0.2])
Z = jnp.array([0.5, -1.5])
ZS = jnp.array([[0.5, -1.5], [jnp.nan, 0.0], [1.0, 1.0]])  # one bad point
DATA = np.random.default_rng(0).normal(size=(32, 2)).astype(np.float32)


def gau(dtype=None):
    """N(MEAN, diag(VAR)): on rectified flow G(z) = MEAN + sqrt(VAR) z."""
    return jf.Gaussian(jnp.asarray(MEAN, dtype), jnp.asarray(VAR, dtype))


def mix():
    return jf.GaussianMixture([0.3, 0.7], MU2, COV2)


def emp():
    return jf.Empirical([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])


def fld(law=None, path=None):
    return jf.AnalyticField(gau() if law is None else law, RF if path is None else path)


def mlp(n=2, seed=0):
    return jf.nn.MLP(n, 8, 1, key=jax.random.key(seed))


def learned(param="velocity", path=None, net=None):
    return jf.LearnedField(mlp() if net is None else net, RF if path is None else path, param)


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def nan_net(x, t):
    return x * jnp.nan


def lin(x, t):
    return jnp.array([0.5, -1.0], x.dtype) * x


def g_rf(z):
    return MEAN + np.sqrt(VAR) * np.asarray(z, np.float64)


def g_inv(x):
    return (np.asarray(x, np.float64) - MEAN) / np.sqrt(VAR)


def g_path(z, path):
    """The exact generation map of gau() on any path (from t_noise to 0)."""
    t1 = path.t_noise
    a1, s1 = float(path.alpha(t1)), float(path.sigma(t1))
    return MEAN + np.sqrt(VAR / (a1**2 * VAR + s1**2)) * (np.asarray(z, np.float64) - a1 * MEAN)


def rf_parts(x, t):
    """(D, s, v, g^2) of gau() on rectified flow, closed form."""
    x = np.asarray(x, np.float64)
    a, s = 1.0 - t, float(t)
    c = a**2 * VAR + s**2
    d = MEAN + a * VAR * (x - a * MEAN) / c
    score = -(x - a * MEAN) / c
    v = -d - s * score
    g2 = 2 * s + 2 * s**2 / a if a > 0 else np.inf
    return d, score, v, g2


def vel_rf(x, t):
    return rf_parts(x, t)[2]


def close(a, b, tol=1e-4):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return bool(a.shape == b.shape and np.all(np.isfinite(a)) and np.allclose(a, b, tol, tol))


def finite(tree):
    return all(bool(np.all(np.isfinite(np.asarray(l, np.float64)))) for l in jax.tree.leaves(tree))


def fit(steps, ckpt=None, model=None, data=None, **kw):
    """A small jf.train run: flow matching of a tiny MLP on DATA."""
    kw.setdefault("batch_size", 8)
    kw.setdefault("progress", False)
    loss = lambda m, x, k: jf.flow_matching_loss(m, RF, x, k)  # noqa: E731
    data = DATA if data is None else data
    model = mlp() if model is None else model
    return jf.train(model, loss, data, steps=steps, key=KEY, checkpoint_dir=ckpt, **kw)


def warned(*words):
    """Whether a warning was issued naming one of `words` (case-insensitive)."""
    return any(w.lower() in m.lower() for m in WARNINGS for w in words)


def truncate_largest(directory):
    """Truncate the largest file under `directory` to half its size."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as fh:
        fh.truncate(os.path.getsize(big) // 2)
'''

# ---------------------------------------------------------------------------
# The child process: run one case, describe what happened as one JSON line.
# ---------------------------------------------------------------------------

HARNESS = r'''
import ast, json, os, re, sys, traceback, warnings

case = json.loads(sys.stdin.read())


def jaxflow_dir():
    mod = sys.modules.get("jaxflow")
    return None if mod is None else os.path.dirname(os.path.realpath(mod.__file__))


def docstring_ids(tree):
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


# a format placeholder or a line break: the message holds what lies between them
PLACEHOLDER = r"\{[^{}]*\}|%[-+ #0-9.]*[sdrfge]|\n"


def literal_fragments(root):
    """Static pieces of the string literals in jaxflow's source (not docstrings)."""
    frags = set()
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            skip = docstring_ids(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if id(node) in skip:
                        continue
                    for piece in re.split(PLACEHOLDER, node.value):
                        piece = piece.strip()
                        if len(piece) >= 16 and " " in piece:
                            frags.add(piece)
    return frags


def core(msg):
    """The message itself, without equinox's debugging advice around it."""
    m = re.search(r"Equinox\w*Error: (.*?)(?:\n\n-{5,}|$)", msg, re.S)
    return m.group(1) if m else msg


def describe(e):
    msg = core(str(e))
    tb = traceback.extract_tb(e.__traceback__)
    last = tb[-1] if tb else None
    root = jaxflow_dir()
    site = "" if last is None else f"{last.filename}:{last.lineno}: {(last.line or '').strip()}"
    in_jf = bool(root and last and os.path.realpath(last.filename).startswith(root + os.sep))
    raised_by_jf = in_jf and (last.line or "").lstrip().startswith("raise")
    prefixed = re.search(r"\bjaxflow\.[A-Za-z_.]+", msg) is not None
    literal = bool(root) and any(f in msg for f in literal_fragments(root))
    return {
        "raised": True,
        "type": type(e).__name__,
        "message": " ".join(msg.split())[:240],
        "full_message": msg[:4000],
        "site": site[:300],
        "in_snippet": bool(last and last.filename in ("<case>", "<prelude>")),
        "owned": bool(raised_by_jf or prefixed or literal),
    }


def block(tree):
    import jax

    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()


ns = {"__name__": "__probe__"}
rec = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        exec(compile(case["prelude"], "<prelude>", "exec"), ns)
        exec(compile(case["code"], "<case>", "exec"), ns)
        block(ns.get("result"))
    except BaseException as e:  # noqa: BLE001 - the probe records everything
        rec = describe(e)
ns["WARNINGS"] = [str(w.message) for w in caught]
if rec is None:
    rec = {"raised": False, "value": " ".join(repr(ns.get("result")).split())[:240]}
    if case["check"]:
        try:
            rec["check"] = bool(eval(case["check"], ns))
        except BaseException as e:  # noqa: BLE001
            rec["check"] = False
            rec["check_error"] = f"{type(e).__name__}: {e}"[:240]
mod = sys.modules.get("jaxflow")
rec["jaxflow_file"] = getattr(mod, "__file__", None)
rec["warnings"] = [" ".join(w.split())[:160] for w in ns["WARNINGS"][:5]]
sys.stdout.write("\n" + "@@PROBE@@" + json.dumps(rec) + "\n")
sys.stdout.flush()
'''


# ---------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    category: str
    name: str
    code: str
    expect: str  # "error" | "value" | "either" (a value passing `check`, or a clear error)
    fix: str | None = None  # regex a good error message contains
    check: str | None = None  # expression over the snippet's names, for values
    x64: bool = False
    timeout: float | None = None
    slow: bool = False  # scheduled first


def E(category, name, code, fix=None, **kw) -> Case:
    """A bad input: a correct jaxflow raises (naming `fix` when given)."""
    return Case(category, name, textwrap.dedent(code).strip(), "error", fix=fix, **kw)


def V(category, name, code, check, **kw) -> Case:
    """A legitimate input: a correct jaxflow returns a value passing `check`."""
    return Case(category, name, textwrap.dedent(code).strip(), "value", check=check, **kw)


def EV(category, name, code, check, fix=None, **kw) -> Case:
    """An edge input where a correct jaxflow either returns a value passing `check`
    or refuses it with a clear error (naming `fix` when given)."""
    code = textwrap.dedent(code).strip()
    return Case(category, name, code, "either", fix=fix, check=check, **kw)


HANG = 40  # timeout of the cases that may loop forever
MAX_STEPS = r"max_steps[^.]{0,40}(positive|\bint\b|integer|>= ?1|> ?0)"  # not "ran out of"

# fmt: off
CASES: list[Case] = [
    # -- 1. laws --------------------------------------------------------------
    E("laws", "gm_weights_unnormalised", "result = jf.GaussianMixture([0.3, 0.3], MU2, COV2)",
      fix="sum to one"),
    E("laws", "gm_weights_negative", "result = jf.GaussianMixture([-0.5, 1.5], MU2, COV2)"),
    E("laws", "gm_weights_zero", "result = jf.GaussianMixture([0.0, 1.0], MU2, COV2)"),
    E("laws", "gm_weights_nan", "result = jf.GaussianMixture([float('nan'), 0.5], MU2, COV2)"),
    E("laws", "gm_cov_not_spd",
      "result = jf.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])",
      fix="positive definite"),
    E("laws", "gm_cov_asymmetric",
      "result = jf.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]])",
      fix="symmetric"),
    EV("laws", "gm_cov_near_singular_f32",
      """
      # exactly representable in float32, SPD, det = 2^-23 (eigenvalue ~6e-8)
      law = jf.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 1.0], [1.0, 1.0 + 2.0**-23]]])
      result = law.log_prob(jnp.zeros(2))
      """,
      "close(result, -math.log(2 * math.pi) + 11.5 * math.log(2), 1e-3)",
      fix="float64|singular|condition"),
    E("laws", "gm_cov_denormal_f32",
      "result = jf.GaussianMixture([1.0], [[0.0, 0.0]], [1e-45]).log_prob(jnp.zeros(2))"),
    E("laws", "gm_empty",
      "result = jf.GaussianMixture(jnp.zeros(0), jnp.zeros((0, 2)), jnp.zeros(0))"),
    V("laws", "gm_int_inputs",
      "result = jf.GaussianMixture([1], [[0, 0]], [1]).log_prob(jnp.zeros(2))",
      "close(result, -math.log(2 * math.pi))"),
    V("laws", "gm_mixed_dtypes_x64",
      """
      law = jf.GaussianMixture(jnp.array([1.0], jnp.float32), jnp.zeros((1, 2)),
                               jnp.array([1.0], jnp.float32))
      result = law.log_prob(jnp.zeros(2, jnp.float32))
      """,
      "close(result, -math.log(2 * math.pi), 1e-6)", x64=True),
    E("laws", "gm_jit_weights_unnormalised",
      "result = jax.jit(lambda w: jf.GaussianMixture(w, MU2, COV2).log_prob(X2))"
      "(jnp.array([0.3, 0.3]))"),
    E("laws", "gm_vmap_weights_one_bad",
      "result = jax.vmap(lambda w: jf.GaussianMixture(w, MU2, COV2).log_prob(X2))"
      "(jnp.array([[0.5, 0.5], [0.3, 0.3]]))"),
    E("laws", "gm_jit_cov_not_spd",
      "result = jax.jit(lambda c: jf.GaussianMixture([1.0], [[0.0, 0.0]], c)"
      ".log_prob(jnp.zeros(2)))(jnp.array([[[1.0, 2.0], [2.0, 1.0]]]))"),
    E("laws", "gm_jit_cov_negative",
      "result = jax.jit(lambda c: jf.GaussianMixture([0.3, 0.7], MU2, c).log_prob(X2))"
      "(jnp.array([-0.2, 0.5]))"),
    E("laws", "gm_filter_jit_cov_nan",
      "result = eqx.filter_jit(lambda c: jf.GaussianMixture([0.3, 0.7], MU2, c).log_prob(X2))"
      "(jnp.array([jnp.nan, 0.5]))"),
    V("laws", "gm_jit_valid",
      "result = jax.jit(lambda w: jf.GaussianMixture(w, MU2, COV2).log_prob(X2))"
      "(jnp.array([0.3, 0.7]))",
      "close(result, mix().log_prob(X2), 1e-6)"),
    E("laws", "gaussian_log_prob_short_x", "result = gau().log_prob(jnp.zeros(1))"),
    E("laws", "gaussian_sample_int_key", "result = gau().sample(0, (3,))", fix="key"),
    E("laws", "emp_empty", "result = jf.Empirical(jnp.zeros((0, 2)))"),
    E("laws", "emp_jit_weights_unnormalised",
      "result = jax.jit(lambda w: jf.Empirical([[0.0, 0.0], [1.0, 1.0]], w)"
      ".marginal_log_prob(X2, 0.5, 0.5))(jnp.array([0.3, 0.3]))"),
    E("laws", "emp_marginal_sigma_zero", "result = emp().marginal_log_prob(X2, 1.0, 0.0)",
      fix="sigma"),
    V("laws", "emp_int_points",
      "result = jf.Empirical([[0, 0], [2, 2]]).marginal_log_prob(jnp.ones(2), 1.0, 1.0)",
      "close(result, -1.0 - math.log(2 * math.pi))"),
    E("laws", "nbr_lower_above_upper",
      "result = jf.GaussianNeighbours([1.0], [[1.0, 0.0]], [[0.0, 1.0]], [0.1])"),
    E("laws", "nbr_jit_lower_above_upper",
      "result = jax.jit(lambda lo: jf.GaussianNeighbours([1.0], lo, [[0.0, 1.0]], [0.1])"
      ".log_prob(jnp.array([0.5, 0.5])))(jnp.array([[1.0, 0.0]]))"),
    E("laws", "nbr_jit_widths_negative",
      "result = jax.jit(lambda w: jf.GaussianNeighbours([1.0], [[0.0]], [[1.0]], w)"
      ".log_prob(jnp.array([0.5])))(jnp.array([-0.1]))"),
    V("laws", "nbr_int_boxes",
      "result = jf.GaussianNeighbours([1], [[0]], [[1]], [0.1]).log_prob(jnp.array([1.0]))",
      "close(result, math.log(0.5), 1e-4)"),
    # -- 2. paths -------------------------------------------------------------
    E("paths", "ou_T_zero", "result = jf.OrnsteinUhlenbeck(0.0)"),
    E("paths", "ou_T_nan", "result = jf.OrnsteinUhlenbeck(float('nan'))"),
    E("paths", "ou_T_bool", "result = jf.OrnsteinUhlenbeck(True)"),
    E("paths", "ou_T_traced",
      "result = jax.jit(lambda T: jf.OrnsteinUhlenbeck(T).alpha(0.5))(2.0)"),
    V("paths", "ou_T_numpy_float32", "result = jf.OrnsteinUhlenbeck(np.float32(2.0)).t_noise",
      "result == 2.0"),
    V("paths", "ou_T_int", "result = jf.OrnsteinUhlenbeck(3).alpha(1.0)",
      "close(result, math.exp(-1.0))"),
    V("paths", "rf_vector_t", "result = RF.sigma(jnp.linspace(0.0, 1.0, 5))",
      "close(result, np.linspace(0, 1, 5))"),
    E("paths", "rf_alpha_outside", "result = RF.alpha(1.5)"),
    E("paths", "ou_sigma_negative_t", "result = jf.OrnsteinUhlenbeck(2.0).sigma(-0.5)"),
    E("paths", "cosine_sigma_outside", "result = jf.Cosine().sigma(1.5)"),
    E("paths", "ou_jit_sigma_negative_t",
      "result = jax.jit(lambda t: jf.OrnsteinUhlenbeck(2.0).sigma(t))(-0.5)"),
    # -- 3. field methods -------------------------------------------------------
    E("fields", "velocity_short_x", "result = fld().velocity(jnp.zeros(1), 0.5)"),
    E("fields", "velocity_long_x", "result = fld().velocity(jnp.zeros(3), 0.5)"),
    E("fields", "velocity_rank2_x", "result = fld().velocity(jnp.zeros((4, 2)), 0.5)"),
    E("fields", "velocity_vector_t", "result = fld().velocity(X2, jnp.array([0.2, 0.4]))"),
    E("fields", "velocity_nan_x", "result = fld().velocity(jnp.array([jnp.nan, 0.0]), 0.5)"),
    E("fields", "velocity_t_above", "result = fld().velocity(X2, 1.5)"),
    V("fields", "velocity_closed_form", "result = fld().velocity(X2, 0.4)",
      "close(result, vel_rf(X2, 0.4))"),
    V("fields", "velocity_int_x", "result = fld().velocity(jnp.array([1, 2]), 0.4)",
      "close(result, vel_rf([1.0, 2.0], 0.4))"),
    V("fields", "velocity_int_t_noise_end", "result = fld().velocity(X2, 1)",
      "close(result, vel_rf(X2, 1.0))"),
    V("fields", "denoise_vmap_times",
      "result = jax.vmap(lambda t: fld().denoise(X2, t))(jnp.array([0.1, 0.5, 0.9]))",
      "close(result, np.stack([rf_parts(X2, t)[0] for t in (0.1, 0.5, 0.9)]))"),
    E("fields", "score_short_x", "result = fld().score(jnp.zeros(1), 0.5)"),
    E("fields", "denoise_jit_short_x",
      "result = jax.jit(lambda x: fld().denoise(x, 0.5))(jnp.zeros(1))"),
    E("fields", "noise_vmap_nan_point",
      "result = jax.vmap(lambda x: fld().noise(x, 0.5))(jnp.array([[0.0, 0.0], [jnp.nan, 1.0]]))"),
    E("fields", "divergence_short_x", "result = fld().divergence(jnp.zeros(1), 0.5)"),
    V("fields", "divergence_closed_vs_trace",
      """
      ref = fld(mix()).divergence(X2, 0.5, method='closed_form')
      result = fld(mix()).divergence(X2, 0.5, method='trace')
      """,
      "close(result, ref, 1e-4)"),
    E("fields", "empirical_velocity_t0", "result = fld(emp()).velocity(X2, 0.0)",
      fix="t_data|sigma|singular|t = 0"),
    E("fields", "empirical_score_jit_t0",
      "result = jax.jit(lambda t: fld(emp()).score(X2, t))(0.0)",
      fix="t_data|sigma|singular|t = 0"),
    E("fields", "log_prob_short_x", "result = fld().log_prob(jnp.zeros(1), 0.5)"),
    E("fields", "log_prob_filter_jit_t_above",
      "result = eqx.filter_jit(lambda f, t: f.log_prob(X2, t))(fld(), jnp.array(1.5))"),
    E("fields", "reverse_drift_rf_noise_end", "result = fld().reverse_drift(jnp.zeros(2), 1.0)"),
    E("fields", "reverse_drift_vmap_short_x",
      "result = jax.vmap(lambda x: fld().reverse_drift(x, 0.5))(jnp.zeros((3, 1)))"),
    V("fields", "reverse_drift_closed_form", "result = fld().reverse_drift(X2, 0.5)",
      "close(result, vel_rf(X2, 0.5) - 0.5 * rf_parts(X2, 0.5)[3] * rf_parts(X2, 0.5)[1])"),
    E("fields", "velocity_vmap_nan_point",
      "result = jax.vmap(lambda x: fld().velocity(x, 0.5))"
      "(jnp.array([[0.0, 0.0], [jnp.nan, 0.0]]))"),
    E("fields", "learned_noise_velocity_noise_end", "result = learned('noise').velocity(X2, 1.0)",
      fix="alpha|t_noise|noise end"),
    E("fields", "learned_data_score_data_end", "result = learned('data').score(X2, 0.0)",
      fix="sigma|t_data|data end"),
    E("fields", "learned_network_scalar",
      "result = learned(net=lambda x, t: jnp.sum(x)).velocity(X2, 0.5)"),
    V("fields", "learned_noise_roundtrip",
      "net = mlp()\nresult = learned('noise', net=net).noise(X2, 0.3)",
      "close(result, net(X2, 0.3), 1e-5)"),
    # -- 4. generate / invert / reconstruct ---------------------------------------
    E("solve", "empirical_generate_to_t0", "result = jf.generate(fld(emp()), Z)", fix="t_data"),
    V("solve", "empirical_generate_t_data",
      "result = jf.generate(fld(emp()), Z, t_data=1e-2)",
      "finite(result) and float(jnp.min(jnp.linalg.norm(emp().points - result, axis=1))) < 0.1"),
    E("solve", "empirical_invert_from_t0", "result = jf.invert(fld(emp()), jnp.array([1.0, 1.0]))",
      fix="t_data"),
    E("solve", "learned_noise_rf_default_span", "result = jf.generate(learned('noise'), Z)",
      fix="t_noise|alpha"),
    E("solve", "rtol_nan", "result = jf.generate(fld(), Z, rtol=float('nan'))",
      fix=r"rtol[^.]{0,80}\bnan\b",
      timeout=HANG, slow=True),
    E("solve", "rtol_zero", "result = jf.generate(fld(), Z, rtol=0.0)",
      fix=r"rtol[^.]{0,80}(> ?0|positive)"),
    E("solve", "atol_negative", "result = jf.generate(fld(), Z, atol=-1.0)",
      fix=r"atol[^.]{0,80}(> ?0|positive)"),
    E("solve", "max_steps_none_empirical_t0",
      "result = jf.generate(fld(emp()), Z, max_steps=None)", fix="t_data|max_steps", timeout=HANG,
      slow=True),
    E("solve", "max_steps_zero", "result = jf.generate(fld(), Z, max_steps=0)", fix=MAX_STEPS),
    V("solve", "max_steps_numpy_int64", "result = jf.generate(fld(), Z, max_steps=np.int64(100))",
      "close(result, g_rf(Z), 1e-4)"),
    E("solve", "max_steps_float", "result = jf.generate(fld(), Z, max_steps=10.5)",
      fix=MAX_STEPS),
    E("solve", "max_steps_none_nan_field",
      "result = jf.generate(learned(net=nan_net), Z, max_steps=None)", timeout=HANG, slow=True),
    EV("solve", "max_steps_none_finite_field", "result = jf.generate(fld(), Z, max_steps=None)",
      "close(result, g_rf(Z), 1e-4)", fix="max_steps"),
    E("solve", "steps_zero", "result = jf.generate(fld(), Z, solver='euler', steps=0)"),
    V("solve", "steps_numpy_int32",
      "result = jf.generate(fld(), Z, solver='heun', steps=np.int32(10))",
      "close(result, g_rf(Z), 1e-2)"),
    E("solve", "solver_unknown", "result = jf.generate(fld(), Z, solver='rk4')"),
    E("solve", "euler_without_steps", "result = jf.generate(fld(), Z, solver='euler')"),
    E("solve", "span_reversed", "result = jf.generate(fld(), Z, t_noise=0.3, t_data=0.8)",
      fix="t_noise|t_data"),
    V("solve", "span_traced_valid",
      "result = jax.jit(lambda tn: jf.generate(fld(), Z, t_noise=tn))(1.0)",
      "close(result, g_rf(Z), 1e-4)"),
    E("solve", "span_traced_reversed",
      "result = jax.jit(lambda td: jf.generate(fld(), Z, t_noise=0.3, t_data=td))(0.8)"),
    E("solve", "times_with_nan",
      "result = jf.generate(fld(), Z, solver='heun', times=np.array([0.0, np.nan, 1.0]))",
      fix="nan|finite"),
    E("solve", "times_traced",
      "result = jax.jit(lambda ts: jf.generate(fld(), Z, solver='heun', times=ts))"
      "(jnp.linspace(0.0, 1.0, 5))"),
    V("solve", "times_valid_grid",
      "result = jf.generate(fld(), Z, solver='heun', times=np.linspace(0.0, 1.0, 21))",
      "close(result, g_rf(Z), 1e-2)"),
    E("solve", "network_scalar_generate",
      "result = jf.generate(learned(net=lambda x, t: jnp.sum(x) * t), Z)"),
    E("solve", "network_wrong_length_generate",
      "result = jf.generate(learned(net=lambda x, t: jnp.zeros(3)), Z)"),
    E("solve", "network_mlp_wrong_dim_generate", "result = jf.generate(learned(net=mlp(3)), Z)"),
    E("solve", "grad_through_generate",
      "result = jax.grad(lambda z: jf.generate(fld(), z).sum())(Z)",
      fix="adjoint|RecursiveCheckpointAdjoint"),
    V("solve", "grad_with_adjoint",
      "result = jax.grad(lambda z: jf.generate(fld(), z, "
      "adjoint=diffrax.RecursiveCheckpointAdjoint()).sum())(Z)",
      "close(result, np.sqrt(VAR), 1e-4)"),
    V("solve", "jvp_through_generate",
      "_, result = jax.jvp(lambda z: jf.generate(fld(), z), (Z,), (jnp.array([1.0, 0.0]),))",
      "close(result, [2.0, 0.0], 1e-4)"),
    E("solve", "throw_string", "result = jf.generate(fld(), Z, throw='yes')"),
    V("solve", "vmap_throw_false_one_nan",
      "result = jax.vmap(lambda z: jf.generate(fld(), z, throw=False))(ZS)",
      "list(np.asarray(result.ok)) == [True, False, True]"
      " and list(np.asarray(result.result == jf.RESULTS.invalid_input)) == [False, True, False]"
      " and bool(np.isnan(np.asarray(result.value[1])).all())"
      " and close(result.value[jnp.array([0, 2])], np.stack([g_rf(ZS[0]), g_rf(ZS[2])]), 1e-4)"),
    V("solve", "batch_map_throw_false_one_nan",
      "result = jf.batch_map(lambda z: jf.generate(fld(), z, throw=False), ZS, batch_size=2)",
      "list(np.asarray(result.ok)) == [True, False, True]"
      " and close(result.value[jnp.array([0, 2])], np.stack([g_rf(ZS[0]), g_rf(ZS[2])]), 1e-4)"),
    V("solve", "jit_vmap_invert_throw_false_one_nan",
      "result = jax.jit(jax.vmap(lambda x: jf.invert(fld(), x, throw=False)))(ZS)",
      "list(np.asarray(result.ok)) == [True, False, True]"
      " and close(result.value[jnp.array([0, 2])], np.stack([g_inv(ZS[0]), g_inv(ZS[2])]), 1e-4)"),
    E("solve", "batch_map_throw_true_one_nan",
      "result = jf.batch_map(lambda z: jf.generate(fld(), z), ZS, batch_size=2)"),
    E("solve", "generate_jit_nan_z",
      "result = jax.jit(lambda z: jf.generate(fld(), z))(jnp.array([jnp.nan, 0.0]))"),
    V("solve", "generate_ou_closed_form",
      "p = jf.OrnsteinUhlenbeck(2.0)\nresult = jf.generate(fld(path=p), Z)",
      "close(result, g_path(Z, p), 1e-4)"),
    V("solve", "reconstruction_error_list", "result = jf.reconstruction_error(fld(), [0.3, -0.2])",
      "finite(result) and float(result) < 1e-4"),
    V("solve", "reconstruction_error_vmap",
      "result = jax.vmap(lambda x: jf.reconstruction_error(fld(), x))(ZS[jnp.array([0, 2])])",
      "finite(result) and float(jnp.max(result)) < 1e-4"),
    V("solve", "reconstruct_throw_false_nan",
      "result = jf.reconstruct(fld(), jnp.array([jnp.nan, 0.0]), throw=False)",
      "bool(np.isnan(np.asarray(result.value)).all())"
      " and bool(result.result == jf.RESULTS.invalid_input)"),
    V("solve", "filter_jit_generate", "result = eqx.filter_jit(jf.generate)(fld(), Z)",
      "close(result, g_rf(Z), 1e-4)"),
    # -- 5. dtypes ------------------------------------------------------------
    V("dtypes", "generate_float16",
      "result = jf.generate(fld(gau(jnp.float16)), Z.astype(jnp.float16))",
      "result.dtype == jnp.float16 and close(result, g_rf(Z), 5e-2)"),
    V("dtypes", "generate_bfloat16",
      "result = jf.generate(fld(gau(jnp.bfloat16)), Z.astype(jnp.bfloat16))",
      "result.dtype == jnp.bfloat16 and close(result, g_rf(Z), 5e-2)"),
    V("dtypes", "generate_float64", "result = jf.generate(fld(), jnp.asarray(Z, jnp.float64))",
      "result.dtype == jnp.float64 and close(result, g_rf(Z), 1e-6)", x64=True),
    V("dtypes", "generate_float32_under_x64",
      "result = jf.generate(fld(gau(jnp.float32)), Z.astype(jnp.float32))",
      "result.dtype == jnp.float32 and close(result, g_rf(Z), 1e-4)", x64=True),
    V("dtypes", "float64_law_float32_point",
      "result = jf.generate(fld(), Z.astype(jnp.float32))",
      "close(result, g_rf(Z), 1e-4)", x64=True),
    V("dtypes", "invert_bfloat16",
      "result = jf.invert(fld(gau(jnp.bfloat16)), X2.astype(jnp.bfloat16))",
      "close(result, g_inv(X2), 5e-2)"),
    V("dtypes", "learned_bf16_generate",
      """
      net = mlp()
      ref = jf.generate(learned(net=net), Z)
      result = jf.generate(learned(net=cast(net, jnp.bfloat16)), Z.astype(jnp.bfloat16))
      """,
      "result.dtype == jnp.bfloat16 and close(result, ref, 5e-2)"),
    V("dtypes", "learned_bf16_invert",
      """
      net = mlp()
      ref = jf.invert(learned(net=net), X2)
      result = jf.invert(learned(net=cast(net, jnp.bfloat16)), X2.astype(jnp.bfloat16))
      """,
      "close(result, ref, 5e-2)"),
    V("dtypes", "learned_bf16_jvp",
      """
      net = mlp()
      u = jnp.array([1.0, 0.0])
      _, ref = jax.jvp(lambda z: jf.generate(learned(net=net), z), (Z,), (u,))
      f16 = learned(net=cast(net, jnp.bfloat16))
      _, result = jax.jvp(lambda z: jf.generate(f16, z), (Z.astype(jnp.bfloat16),),
                          (u.astype(jnp.bfloat16),))
      """,
      "close(result, ref, 5e-2)"),
    V("dtypes", "learned_f16_generate",
      """
      net = mlp()
      ref = jf.generate(learned(net=net), Z)
      result = jf.generate(learned(net=cast(net, jnp.float16)), Z.astype(jnp.float16))
      """,
      "close(result, ref, 5e-2)"),
    V("dtypes", "log_det_generation_bfloat16",
      "result = jf.log_det_generation(fld(gau(jnp.bfloat16)), Z.astype(jnp.bfloat16))",
      "close(result, 0.5 * np.sum(np.log(VAR)), 5e-2)"),
    E("dtypes", "generate_complex_z", "result = jf.generate(fld(), jnp.array([1.0 + 1.0j, 0.0]))"),
    # -- 6. sampling ----------------------------------------------------------
    V("sampling", "sde_steps_numpy_int",
      "result = jf.sample_sde(fld(), Z, KEY, steps=np.int64(20))",
      "result.shape == (2,) and finite(result)"),
    E("sampling", "sde_int_key", "result = jf.sample_sde(fld(), Z, 0, steps=10)", fix="key"),
    E("sampling", "sde_nan_z",
      "result = jf.sample_sde(fld(), jnp.array([jnp.nan, 0.0]), KEY, steps=10)"),
    E("sampling", "sde_span_reversed",
      "result = jf.sample_sde(fld(), Z, KEY, steps=10, t_noise=0.2, t_data=0.8)"),
    E("sampling", "sde_interpolant",
      "result = jf.sample_sde(jf.InterpolantField(mlp(), RF), Z, KEY, steps=10)"),
    V("sampling", "sde_throw_false_one_nan",
      "result = jax.vmap(lambda z: jf.sample_sde(fld(), z, KEY, steps=10, throw=False))(ZS)",
      "list(np.asarray(result.ok)) == [True, False, True]"
      " and finite(result.value[jnp.array([0, 2])])"),
    E("sampling", "ddpm_int_key", "result = jf.sample_ddpm(fld(), Z, 0, steps=10)", fix="key"),
    E("sampling", "ddpm_times_decreasing",
      "result = jf.sample_ddpm(fld(), Z, KEY, times=np.array([1.0, 0.5, 0.0]))"),
    V("sampling", "ddpm_dirac_exact",
      "result = jf.sample_ddpm(fld(jf.Empirical([[1.0, -2.0]])), Z, KEY, steps=np.int32(5))",
      "close(result, [1.0, -2.0], 1e-4)"),
    E("sampling", "ddpm_step_t_next_after_t", "result = jf.ddpm_step(RF, X2, 0.3, 0.6, X2, X2)"),
    E("sampling", "ddpm_step_jit_reversed",
      "result = jax.jit(lambda t: jf.ddpm_step(RF, X2, t, 0.6, X2, X2))(0.3)"),
    E("sampling", "ddpm_step_shape_mismatch",
      "result = jf.ddpm_step(RF, X2, 0.6, 0.3, jnp.zeros(3), X2)"),
    V("sampling", "ddpm_coefficients_closed_form",
      "result = jnp.stack(jf.ddpm_coefficients(RF, 0.6, 0.3))",
      "close(result, [(0.4 / 0.7) * 0.09 / 0.36, 0.7 * (0.36 - (0.4 / 0.7 * 0.3) ** 2) / 0.36,"
      " (0.36 - (0.4 / 0.7 * 0.3) ** 2) * 0.09 / 0.36], 1e-5)"),
    E("sampling", "reverse_sde_step_negative_h",
      "result = jf.reverse_sde_step(fld(), X2, 0.5, -0.1, X2)"),
    E("sampling", "reverse_sde_step_h_past_data",
      "result = jf.reverse_sde_step(fld(), X2, 0.5, 0.8, X2)"),
    E("sampling", "reverse_sde_step_noise_end",
      "result = jf.reverse_sde_step(fld(), jnp.zeros(2), 1.0, 0.1, jnp.zeros(2))"),
    V("sampling", "reverse_sde_step_closed_form",
      "result = jf.reverse_sde_step(fld(), X2, 0.5, 0.1, jnp.array([1.0, -1.0]))",
      "close(result, np.asarray(X2) - 0.1 * (vel_rf(X2, 0.5) - 0.5 * rf_parts(X2, 0.5)[3]"
      " * rf_parts(X2, 0.5)[1]) + np.sqrt(rf_parts(X2, 0.5)[3] * 0.1) * np.array([1.0, -1.0]))"),
    # -- 7. analysis ----------------------------------------------------------
    V("analysis", "jacobian_closed_form",
      "result = jf.jacobian(lambda z: jf.generate(fld(), z), Z)",
      "close(result, np.diag(np.sqrt(VAR)), 1e-4)"),
    V("analysis", "singular_values_closed_form",
      "result = jf.singular_values(lambda z: jf.generate(fld(), z), Z)",
      "close(result, [2.0, 0.5], 1e-4)"),
    V("analysis", "geometric_mean_closed_form",
      "result = jf.geometric_mean_singular_value(lambda z: jf.generate(fld(), z), Z)",
      "close(result, 1.0, 1e-4)"),
    E("analysis", "intrinsic_nan_direction",
      "result = jf.intrinsic_instability(lambda z: 2.0 * z, Z, jnp.array([jnp.nan, 1.0]))"),
    E("analysis", "intrinsic_zero_direction_jit",
      "result = jax.jit(lambda u: jf.intrinsic_instability(lambda z: 2.0 * z, Z, u))"
      "(jnp.zeros(2))"),
    E("analysis", "intrinsic_zero_direction_vmap",
      "result = jax.vmap(lambda u: jf.intrinsic_instability(lambda z: 2.0 * z, Z, u))"
      "(jnp.array([[1.0, 0.0], [0.0, 0.0]]))"),
    V("analysis", "intrinsic_closed_form",
      "result = jf.intrinsic_instability(lambda z: jf.generate(fld(), z), Z, jnp.ones(2))",
      "close(result, math.sqrt(4.25 / 2), 1e-4)"),
    E("analysis", "coefficient_nan_perturbation",
      "result = jf.instability_coefficient(lambda z: 2.0 * z, Z, jnp.array([jnp.nan, 1.0]))"),
    E("analysis", "probability_zero_samples",
      "result = jf.instability_probability(fld(), jnp.zeros((0, 2)), 2.0)"),
    V("analysis", "probability_gaussian",
      "result = jf.instability_probability(fld(), gau().sample(KEY, (8,)), [0.5, 2.0])",
      "close(result.p_m, [1.0, 0.0]) and close(result.log_ebar, np.zeros(8), 1e-3)"),
    V("analysis", "probability_throw_false_nan",
      "result = jf.instability_probability(fld(), ZS, 0.5, throw=False)",
      "list(np.asarray(result.ok)) == [True, False, True] and close(result.value.p_m, [1.0])"),
    V("analysis", "amplified_bound_c_one", "result = jf.amplified_error_bound(0.1, 2.0, 1.0)",
      "close(result, 0.1, 1e-6)"),
    E("analysis", "amplified_bound_c_negative",
      "result = jf.amplified_error_bound(0.1, 2.0, -2.0)"),
    V("analysis", "log_det_divergence_vs_density",
      """
      ref = jf.log_det_generation(fld(mix()), Z, route='density')
      result = jf.log_det_generation(fld(mix()), Z)
      """,
      "close(result, ref, 1e-3)"),
    E("analysis", "log_det_empirical_t0", "result = jf.log_det_generation(fld(emp()), Z)",
      fix="t_data"),
    E("analysis", "log_det_short_z", "result = jf.log_det_generation(fld(), jnp.zeros(1))"),
    V("analysis", "invert_with_log_det_closed_form",
      "result = jf.invert_with_log_det(fld(jf.Gaussian(MEAN, jnp.array([4.0, 1.0]))), X2)",
      "close(result[1], -math.log(2.0), 1e-4)"
      " and close(result[0], (np.asarray(X2) - MEAN) / np.array([2.0, 1.0]), 1e-4)"),
    E("analysis", "invert_with_log_det_nan",
      "result = jf.invert_with_log_det(fld(), jnp.array([jnp.nan, 0.0]))"),
    V("analysis", "generate_with_jacobian_closed_form",
      "result = jf.generate_with_jacobian(fld(), Z)",
      "close(result[0], g_rf(Z), 1e-4) and close(result[1], np.diag(np.sqrt(VAR)), 1e-4)"),
    V("analysis", "lyapunov_linear",
      "result = jf.lyapunov_spectrum(lin, jnp.ones(2), 0.0, 1.0, steps=10)",
      "close(result.exponents, [0.5, -1.0], 1e-4)"),
    E("analysis", "lyapunov_transient_too_long",
      "result = jf.lyapunov_spectrum(lin, jnp.ones(2), 0.0, 1.0, steps=4, transient_time=0.9)",
      fix="transient"),
    E("analysis", "lyapunov_k_zero",
      "result = jf.lyapunov_spectrum(lin, jnp.ones(2), 0.0, 1.0, steps=4, k=0)"),
    E("analysis", "lyapunov_k_too_big",
      "result = jf.lyapunov_spectrum(lin, jnp.ones(2), 0.0, 1.0, steps=4, k=3)"),
    V("analysis", "lyapunov_k_numpy_int",
      "result = jf.lyapunov_spectrum(lin, jnp.ones(2), 0.0, 1.0, steps=10, k=np.int64(1))",
      "close(result.exponents, [0.5], 1e-4)"),
    E("analysis", "lyapunov_dt_zero",
      "result = jf.lyapunov_spectrum(lin, jnp.ones(2), 0.0, 1.0, dt=0.0)"),
    E("analysis", "lyapunov_t1_nan",
      "result = jf.lyapunov_spectrum(lin, jnp.ones(2), 0.0, float('nan'), steps=4)",
      fix=r"^(?!.*transient).*\b(t1|t0)\b"),
    E("analysis", "lyapunov_f_wrong_shape",
      "result = jf.lyapunov_spectrum(lambda x, t: jnp.zeros(3), jnp.ones(2), 0.0, 1.0, steps=4)"),
    E("analysis", "lyapunov_nan_field",
      "result = jf.lyapunov_spectrum(nan_net, jnp.ones(2), 0.0, 1.0, steps=4)"),
    V("analysis", "lyapunov_map_linear",
      "result = jf.lyapunov_spectrum_of_map(lambda x, i: jnp.array([2.0, 0.5]) * x,"
      " jnp.ones(2), 5)",
      "close(result.exponents, [math.log(2.0), math.log(0.5)], 1e-5)"),
    V("analysis", "lyapunov_map_transient_numpy_int",
      "result = jf.lyapunov_spectrum_of_map(lambda x, i: jnp.array([2.0, 0.5]) * x, jnp.ones(2),"
      " 5, transient_steps=np.int64(1))",
      "close(result.exponents, [math.log(2.0), math.log(0.5)], 1e-5)"),
    V("analysis", "lyapunov_map_vmap_throw_false",
      "result = jax.vmap(lambda x: jf.lyapunov_spectrum_of_map(lambda y, i: 2.0 * y, x, 3,"
      " throw=False))(jnp.array([[1.0, 1.0], [jnp.nan, 1.0]]))",
      "list(np.asarray(result.ok)) == [True, False]"
      " and close(result.value.exponents[0], [math.log(2.0)] * 2, 1e-5)"),
    E("analysis", "alignment_zero_score", "result = jf.alignment(jnp.zeros(2), jnp.eye(2))"),
    # -- 8. batch_map ---------------------------------------------------------
    E("batch_map", "batch_size_zero",
      "result = jf.batch_map(lambda x: x, jnp.zeros((4, 2)), batch_size=0)"),
    V("batch_map", "batch_size_numpy_int",
      "result = jf.batch_map(lambda x: 2 * x, jnp.ones((5, 2)), batch_size=np.int64(2))",
      "close(result, 2 * np.ones((5, 2)))"),
    V("batch_map", "empty_batch",
      "result = jf.batch_map(lambda x: 2 * x, jnp.zeros((0, 2)), batch_size=4)",
      "result.shape == (0, 2)"),
    E("batch_map", "mismatched_leading_axes",
      "result = jf.batch_map(lambda a: a[0] + a[1].sum(), (jnp.zeros(3), jnp.zeros((4, 2))),"
      " batch_size=2)",
      fix=r"leading ax|axis size|inconsistent sizes|different (leading|sizes)"),
    E("batch_map", "scalar_xs", "result = jf.batch_map(lambda x: x, 1.0, batch_size=2)",
      fix=r"leading ax|batch axis"),
    V("batch_map", "generate_equals_vmap",
      "zs = jax.random.normal(KEY, (5, 2))\n"
      "result = jf.batch_map(lambda z: jf.generate(fld(), z), zs, batch_size=2)",
      "close(result, np.stack([g_rf(z) for z in np.asarray(zs)]), 1e-4)"),
    V("batch_map", "batch_size_larger_than_n",
      "result = jf.batch_map(lambda x: 2 * x, jnp.ones((3, 2)), batch_size=100)",
      "close(result, 2 * np.ones((3, 2)))"),
    # -- 9. train / load_checkpoint -------------------------------------------
    E("train", "config_not_json",
      "result = fit(3, 'ck', checkpoint_every=2, config={'f': object()})", fix="config",
      slow=True),
    E("train", "steps_below_checkpoint",
      "fit(20, 'ck', checkpoint_every=10)\nresult = fit(5, 'ck', checkpoint_every=10)", slow=True),
    V("train", "resume_from_older_when_latest_truncated",
      "fit(4, 'ck', checkpoint_every=2)\ntruncate_largest('ck/4')\n"
      "result = fit(6, 'ck', checkpoint_every=2)",
      "result.step == 6 and len(result.losses) == 4 and finite(result.losses)"
      " and warned('checkpoint', 'restor', 'step 4')", slow=True),
    V("train", "stray_empty_step_folder",
      "fit(4, 'ck', checkpoint_every=2)\nos.makedirs('ck/30')\n"
      "result = fit(6, 'ck', checkpoint_every=2)",
      "result.step == 6 and len(result.losses) == 2", slow=True),
    E("train", "different_model_width",
      "fit(2, 'ck')\nresult = fit(4, 'ck', model=jf.nn.MLP(2, 16, 1, key=KEY))", slow=True),
    E("train", "load_checkpoint_different_width",
      "fit(2, 'ck')\nresult = jf.load_checkpoint('ck', jf.nn.MLP(2, 16, 1, key=KEY))", slow=True),
    E("train", "load_checkpoint_missing_dir",
      "result = jf.load_checkpoint('does_not_exist', mlp())"),
    V("train", "load_checkpoint_roundtrip",
      "r = fit(2, 'ck')\nresult = jf.load_checkpoint('ck', mlp())",
      "result[2] == 2 and close(result[0].layers[0].weight, r.model.layers[0].weight, 1e-6)",
      slow=True),
    E("train", "data_rank1", "result = fit(2, data=DATA[:, 0])"),
    E("train", "data_nan", "result = fit(2, data=np.full((4, 2), np.nan, np.float32))"),
    E("train", "batch_size_zero", "result = fit(2, batch_size=0)"),
    E("train", "ema_decay_above_one", "result = fit(2, ema_decay=1.5)"),
    V("train", "steps_numpy_int", "result = fit(np.int64(3))",
      "result.step == 3 and finite(result.losses)"),
    E("train", "int_key",
      "result = jf.train(mlp(), lambda m, x, k: jf.flow_matching_loss(m, RF, x, k), DATA,"
      " steps=2, key=0, progress=False)", fix="key"),
    # -- 10. data -------------------------------------------------------------
    E("data", "mnist_without_tfds",
      "sys.modules['tensorflow_datasets'] = None\nresult = jf.data.mnist(data_dir='tfds')"),
    E("data", "mnist_not_prepared_no_download",
      "result = jf.data.mnist(data_dir='tfds', download=False)"),
    E("data", "mnist_not_prepared_download", "result = jf.data.mnist(data_dir='tfds')",
      timeout=HANG),
    E("data", "two_moons_zero", "result = jf.data.two_moons(KEY, 0)"),
    V("data", "two_moons_numpy_int", "result = jf.data.two_moons(KEY, np.int64(5))",
      "result.shape == (5, 2) and finite(result)"),
    V("data", "digits_16", "result = jf.data.digits(16)[0]",
      "result.shape == (1797, 256) and float(result.min()) == -1.0 and float(result.max()) <= 1.0"),
    E("data", "tiling_neighbours_k_zero", "result = jf.data.tiling_neighbours(2, 0)"),
    # -- 11. nn ---------------------------------------------------------------
    E("nn", "mlp_width_zero", "result = jf.nn.MLP(2, 0, 1, key=KEY)"),
    E("nn", "mlp_depth_negative", "result = jf.nn.MLP(2, 8, -1, key=KEY)"),
    E("nn", "mlp_int_key", "result = jf.nn.MLP(2, 8, 1, key=0)", fix="key"),
    E("nn", "mlp_call_wrong_length", "result = mlp()(jnp.zeros(3), 0.5)"),
    E("nn", "mlp_call_vector_t", "result = mlp()(X2, jnp.array([0.1, 0.2]))"),
    V("nn", "mlp_numpy_sizes",
      "result = jf.nn.MLP(np.int64(2), np.int64(8), np.int64(1), key=KEY)(X2, 0.5)",
      "result.shape == (2,) and finite(result)"),
    E("nn", "unet_not_divisible",
      "result = jf.nn.UNet((1, 10, 10), channels=4, multipliers=(1, 2, 2), key=KEY)"),
    E("nn", "unet_no_multipliers",
      "result = jf.nn.UNet((1, 8, 8), channels=4, multipliers=(), key=KEY)"),
    V("nn", "unet_small_call",
      "result = jf.nn.UNet((1, 8, 8), channels=4, multipliers=(1,), heads=1, key=KEY)"
      "(jnp.zeros(64), 0.5)",
      "result.shape == (64,) and finite(result)", slow=True),
    E("nn", "flax_nnx_not_module", "result = jf.nn.FlaxNNX(lambda x, t: x)"),
    E("nn", "flax_nnx_batchnorm",
      """
      from flax import nnx

      class Net(nnx.Module):
          def __init__(self, rngs):
              self.lin = nnx.Linear(3, 2, rngs=rngs)
              self.bn = nnx.BatchNorm(2, rngs=rngs)

          def __call__(self, x, t):
              return self.bn(self.lin(jnp.concatenate([x, jnp.atleast_1d(t)])))

      result = jf.nn.FlaxNNX(Net(nnx.Rngs(0)))
      """),
    V("nn", "flax_nnx_generate",
      """
      from flax import nnx

      class Net(nnx.Module):
          def __init__(self, rngs):
              self.lin = nnx.Linear(3, 2, rngs=rngs)

          def __call__(self, x, t):
              return self.lin(jnp.concatenate([x, jnp.atleast_1d(t)]))

      result = jf.generate(jf.LearnedField(jf.nn.FlaxNNX(Net(nnx.Rngs(0))), RF, 'velocity'), Z)
      """,
      "result.shape == (2,) and finite(result)"),
    E("nn", "flax_nnx_wrong_output_generate",
      """
      from flax import nnx

      class Net(nnx.Module):
          def __init__(self, rngs):
              self.lin = nnx.Linear(3, 3, rngs=rngs)

          def __call__(self, x, t):
              return self.lin(jnp.concatenate([x, jnp.atleast_1d(t)]))

      result = jf.generate(jf.LearnedField(jf.nn.FlaxNNX(Net(nnx.Rngs(0))), RF, 'velocity'), Z)
      """),
    E("nn", "embedding_vector_t", "result = jf.nn.sinusoidal_embedding(jnp.array([0.1, 0.2]), 8)"),
    # -- 12. objectives -------------------------------------------------------
    E("objectives", "fm_rank1_x", "result = jf.flow_matching_loss(mlp(), RF, jnp.zeros(2), KEY)"),
    E("objectives", "fm_network_dim_mismatch",
      "result = jf.flow_matching_loss(mlp(3), RF, jnp.zeros((4, 2)), KEY)"),
    E("objectives", "fm_network_scalar",
      "result = jf.flow_matching_loss(lambda x, t: jnp.sum(x), RF, jnp.ones((4, 2)), KEY)"),
    E("objectives", "fm_t_margin_negative",
      "result = jf.flow_matching_loss(mlp(), RF, jnp.ones((4, 2)), KEY, t_margin=-0.1)"),
    E("objectives", "fm_t_margin_too_big",
      "result = jf.flow_matching_loss(mlp(), RF, jnp.ones((4, 2)), KEY, t_margin=0.6)"),
    E("objectives", "fm_int_key", "result = jf.flow_matching_loss(mlp(), RF, jnp.ones((4, 2)), 0)",
      fix="key"),
    E("objectives", "dsm_rank1_x",
      "result = jf.denoising_score_matching_loss(mlp(), RF, jnp.zeros(2), KEY)"),
    V("objectives", "fm_jit",
      "result = jax.jit(lambda k: jf.flow_matching_loss(mlp(), RF, jnp.ones((4, 2)), k))(KEY)",
      "result.shape == () and finite(result)"),
    V("objectives", "fm_exact_velocity_dirac",
      """
      f = fld(jf.Empirical([[1.0, -2.0]]))
      x = jnp.tile(jnp.array([[1.0, -2.0]]), (8, 1))
      result = jf.flow_matching_loss(f.velocity, RF, x, KEY)
      """,
      "float(result) < 1e-6"),
    E("objectives", "ot_pairing_mismatched",
      "result = jf.ot_pairing(jnp.zeros((4, 2)), jnp.zeros((3, 2)), KEY)"),
]
# fmt: on


# ---------------------------------------------------------------------------
# Running and classifying.
# ---------------------------------------------------------------------------


def child_env(tree: Path | None, x64: bool) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_TRACEBACK_FILTERING="off",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("JAX_ENABLE_X64", None)
    if x64:
        env["JAX_ENABLE_X64"] = "1"
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    return env


def run_child(case: Case, tree: Path | None, timeout: float) -> tuple[dict | None, bool, str]:
    """Run `case` in a fresh interpreter: `(record, timed_out, stderr tail)`."""
    payload = json.dumps({"prelude": PRELUDE, "code": case.code, "check": case.check})
    with tempfile.TemporaryDirectory(prefix="jfprobe_") as cwd:
        proc = subprocess.Popen(
            [sys.executable, "-c", HARNESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_env(tree, case.x64),
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return None, True, err[-500:]
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if not lines:
        return None, False, f"exit {proc.returncode}: {err[-500:]}"
    return json.loads(lines[-1][len(MARK) :]), False, err[-500:]


def classify(case: Case, rec: dict | None, timed_out: bool, stderr: str) -> tuple[str, str]:
    """`(outcome, note)` of one run."""
    if timed_out:
        return "hang", "timed out"
    if rec is None:
        return "cryptic", "no report (crashed): " + " ".join(stderr.split())[-160:]
    notes = []
    if rec.get("raised") and rec.get("in_snippet") and not rec.get("owned"):
        notes.append("raised in the snippet")
    if rec["raised"]:
        if case.expect == "value":
            owner = "jaxflow" if rec["owned"] else "foreign"
            return "cryptic", "; ".join([f"false alarm ({owner} message)", *notes])
        if case.fix:
            ok = re.search(case.fix, rec["full_message"], re.I | re.S) is not None
            notes.append(f"fix /{case.fix}/ " + ("named" if ok else "not named"))
        else:
            ok = rec["owned"]
            if not ok:
                notes.append("not raised by jaxflow")
        return ("clear" if ok else "cryptic"), "; ".join(notes)
    if case.expect == "error":
        return "silent", "no error"
    # "value" or "either": the value must pass its check
    if rec.get("check"):
        return "ok", ""
    return "silent", "check failed" + (f": {rec['check_error']}" if "check_error" in rec else "")


def run_case(case: Case, tree: Path | None, default_timeout: float) -> dict:
    timeout = case.timeout or default_timeout
    start = time.perf_counter()
    rec, timed_out, stderr = run_child(case, tree, timeout)
    outcome, note = classify(case, rec, timed_out, stderr)
    rec = rec or {}
    if tree is not None and rec.get("jaxflow_file"):
        if not os.path.realpath(rec["jaxflow_file"]).startswith(os.path.realpath(tree)):
            note = "; ".join(filter(None, [note, f"imported {rec['jaxflow_file']}"]))
    head = rec.get("message") if rec.get("raised") else rec.get("value", "")
    return {
        "category": case.category,
        "name": case.name,
        "expect": case.expect,
        "fix": case.fix,
        "x64": case.x64,
        "outcome": outcome,
        "type": rec.get("type", "timeout" if timed_out else ""),
        "message": (head or "")[:200],
        "note": note,
        "site": rec.get("site", ""),
        "warnings": rec.get("warnings", []),
        "seconds": round(time.perf_counter() - start, 2),
    }


def run_all(cases: list[Case], tree: Path | None, jobs: int, timeout: float) -> list[dict]:
    order = sorted(cases, key=lambda c: not c.slow)  # slow first, to shorten the tail
    done = 0

    def one(case):
        nonlocal done
        row = run_case(case, tree, timeout)
        done += 1
        print(
            f"[{done:3d}/{len(cases)}] {row['outcome']:7s} {case.category}/{case.name}"
            f" ({row['seconds']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(one, order))
    rank = {id(c): i for i, c in enumerate(cases)}
    by_case = dict(zip((id(c) for c in order), rows, strict=True))
    return [by_case[id(c)] for c in sorted(cases, key=lambda c: rank[id(c)])]


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def counts(rows: list[dict]) -> dict:
    c = collections.Counter(r["outcome"] for r in rows)
    return {k: c.get(k, 0) for k in OUTCOMES}


def text_table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"jaxflow probe: {meta['tree']} ({len(rows)} cases, {meta['wall_s']:.0f} s)",
        "  ".join(f"{k} {v}" for k, v in meta["counts"].items()),
        "",
    ]
    for r in rows:
        msg = (r["type"] + ": " if r["type"] else "") + r["message"]
        lines.append(f"{r['category']:10s} {r['name']:42s} {r['outcome']:7s} {msg[:100]}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], meta: dict) -> str:
    out = [
        f"# jaxflow probe: `{meta['tree']}`",
        "",
        f"{len(rows)} cases, wall time {meta['wall_s']:.0f} s, {meta['jobs']} jobs, "
        f"timeout {meta['timeout']:.0f} s.",
        "",
        "| " + " | ".join(OUTCOMES) + " |",
        "|" + "---|" * len(OUTCOMES),
        "| " + " | ".join(str(v) for v in meta["counts"].values()) + " |",
        "",
        "| category | case | expect | outcome | error | message head | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['category']} | {r['name']} | {r['expect']} | **{r['outcome']}** | "
            f"{_cell(r['type'])} | {_cell(r['message'])} | {_cell(r['note'])} |"
        )
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tree",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="checkout whose jaxflow is probed (put first on PYTHONPATH)",
    )
    p.add_argument("--only", default=None, help="regex on 'category/name'")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tree = args.tree.resolve()
    if not (tree / "jaxflow" / "__init__.py").is_file():
        sys.exit(f"{tree} holds no jaxflow package")
    cases = [c for c in CASES if not args.only or re.search(args.only, f"{c.category}/{c.name}")]
    names = [f"{c.category}/{c.name}" for c in CASES]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        sys.exit(f"duplicate case names: {sorted(dupes)}")
    start = time.perf_counter()
    rows = run_all(cases, tree, args.jobs, args.timeout)
    meta = {
        "tree": str(tree),
        "wall_s": round(time.perf_counter() - start, 1),
        "jobs": args.jobs,
        "timeout": args.timeout,
        "counts": counts(rows),
    }
    print(text_table(rows, meta))
    if args.json:
        args.json.write_text(json.dumps({**meta, "cases": rows}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown_table(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
