"""Triton kernels on the CPU: a check script runs in a fresh process under TRITON_INTERPRET=1 (Triton reads
it when a kernel is decorated); the same checks run on CUDA from the bench scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str) -> str:
    """stdout of tests/<name> under the interpreter; fails with its output when it exits non-zero."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / name)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def run_each(module: dict, names, device: str) -> None:
    """Call each named check of a check module, one 'ok NAME (device)' line per check passed."""
    for name in names:
        module[name]()
        print("ok", name, f"({device})", flush=True)


def main(run_checks) -> None:
    """A check script's entry point: only under the interpreter, on the CPU."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    run_checks("cpu")
    sys.exit(0)
