"""Shared plumbing for the example scripts: arguments, JSON records, timing."""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small settings for tests")
    p.add_argument("--out", default="out", help="output directory (default ./out)")
    p.add_argument("--seed", type=int, default=0)
    return p


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


class Record:
    """Collects settings and results; writes `<name>.json` beside the PNG."""

    def __init__(self, name: str, out: str, settings: dict):
        self.name = name
        self.out = out
        os.makedirs(out, exist_ok=True)
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
