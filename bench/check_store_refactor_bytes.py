"""Byte-identity of the store package against the single-module store it replaced (issue 13).

Writes the same samples with `shared/store.py` as of REF (loaded from `git show REF:shared/store.py`)
and with today's `shared.store` package, for several specs, and compares every file byte for byte.
Excluded: the wall-clock fields `written` (manifests, and the manifests inside index snapshots) and
`started` / `pid` (writers/<id>.json); those JSON files are compared with the fields removed.

    PYTHONPATH=. python bench/check_store_refactor_bytes.py [--ref db99933]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from shared import store as new

PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="sft-no-cot",
            dataset_revision="r1", code_version="test")
BASE = dict(num_layers=4, num_kv_heads=2, head_dim=64, hidden_size=96, thumb_hw=(6, 10))
CONFIGS = {
    "bf16-zstd": {},
    "fp32": dict(kv_dtype="float32"),
    "int8": dict(quant="int8"),
    "int4": dict(quant="int4"),
    "blosc": dict(codec="blosc-lz4"),
    "raw": dict(codec="none"),
    "no-hidden": dict(store_hidden=False),
    "multi-chunk": dict(chunk_mb=0.02),
    "shard": dict(shard=True, chunk_mb=0.02),
    "int4-shard": dict(quant="int4", shard=True, chunk_mb=0.01),
}
VOLATILE = {"written", "started", "pid"}


def load_old(ref: str):
    src = subprocess.run(["git", "show", f"{ref}:shared/store.py"], check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "store_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("store_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["store_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            b = p.read_bytes()
            out[rel] = strip(json.loads(b)) if rel.startswith(("commits/", "index/", "writers/")) else b
    return out


def build(mod, url: str, spec_kw: dict, **kw) -> None:
    spec = mod.KVSpec(**BASE, **spec_kw)
    with mod.StoreWriter.create(url, PROV, spec, **kw) as w:
        for i in range(6):
            # synthetic samples from the package (identical function in both); lengths cross chunk edges
            s = new.synthetic_sample(i, new.KVSpec(**BASE, **spec_kw), prefix_len=5 + 37 * i)
            w.write(mod.CachedSample(**vars(s)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="db99933", help="commit whose shared/store.py is the reference")
    ref = ap.parse_args().ref
    old = load_old(ref)
    tmp = Path(tempfile.mkdtemp())
    bad = 0
    for i in range(6):  # the sample generator itself moved: same tensors and arrays, bit for bit
        a = vars(old.synthetic_sample(i, old.KVSpec(**BASE)))
        b = vars(new.synthetic_sample(i, new.KVSpec(**BASE)))
        same = a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else np.array_equal(a[k], b[k])
            if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)
        bad += not same
    print(f"synthetic_sample: {'IDENTICAL' if not bad else 'DIFFERS'}")
    for name, kw in CONFIGS.items():
        runs = {"old-threads": (old, {}), "new-threads": (new, {}), "new-procs": (new, {"processes": 2})}
        trees = {}
        for run, (mod, wkw) in runs.items():
            build(mod, str(tmp / name / run), kw, **wkw)
            trees[run] = tree(tmp / name / run)
        ref_tree = trees["old-threads"]
        for run in ("new-threads", "new-procs"):
            diff = sorted(k for k in set(ref_tree) | set(trees[run]) if ref_tree.get(k) != trees[run].get(k))
            bad += bool(diff)
            print(f"{name:12s} {run:12s} files={len(trees[run]):4d} "
                  f"{'IDENTICAL' if not diff else f'DIFFER in {len(diff)}: {diff[:4]}'}")
    print("all identical" if not bad else f"{bad} runs differ")
    return int(bool(bad))


if __name__ == "__main__":
    raise SystemExit(main())
