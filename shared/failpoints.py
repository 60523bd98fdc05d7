"""Failpoints: named places where a fault-injection run makes this process stop, die or fail.

Off (one dict lookup) unless the environment says otherwise, so builds and training never pay for them:

    ALPAMAYO_FAILPOINTS="before_commit=hold@3,chunk_write=enospc@10"   # name=action[@nth hit in this process]
    ALPAMAYO_FAILPOINTS_MARKER=/tmp/x/marker                          # where `hold` reports (JSON lines)

Actions: `hold` appends {"name", "pid", ...} to the marker file, then sleeps until killed (the harness
waits for the line, checks the torn state, sends SIGKILL); `exit` dies at once (os._exit(137), like a
SIGKILL); `enospc` raises OSError(ENOSPC) (a full disk); `raise` raises `Failpoint`, a BaseException
no handler catches: the fast in-process stand-in for a kill, where what is on disk at that moment is
what the test checks. With `partial=(path, data)` the first half of `data` is written to `path`
first: the torn file a kill mid-write leaves. Child processes inherit the variables (the store's writer
processes count their own hits). Points: store `chunk_write`, `before_commit`, `manifest_write`,
`index_write`; cache-build `prefill`; head-train `train_batch` (a step's batch handed to the loop),
`ckpt_file_write` (each checkpoint file, `partial` = that file cut in half), `ckpt_before_rename`
(a whole `step_N.partial`), `ckpt_after_rename` (older checkpoints not yet pruned), `ckpt_prune` (an
old checkpoint renamed to `.deleting`, not yet removed), `best_write` (a best head renamed, index.json
not yet updated). bench/fault_injection.py and tests/test_faults_*.py drive them.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time

_SPEC = os.environ.get("ALPAMAYO_FAILPOINTS", "")
_ACTIVE: dict[str, tuple[str, int]] = {}
for _item in filter(None, (s.strip() for s in _SPEC.split(","))):
    _name, _, _act = _item.partition("=")
    _act, _, _nth = _act.partition("@")
    _ACTIVE[_name] = (_act, int(_nth or 1))
_hits: dict[str, int] = {}
_lock = threading.Lock()


class Failpoint(BaseException):  # noqa: N818 - not an error of the code under test
    """Raised by the `raise` action: stops the process's work where it stands."""


def armed(name: str) -> bool:
    """Whether `name` is set up at all (to skip preparing a `partial` for nothing)."""
    return name in _ACTIVE


def failpoint(name: str, partial: tuple[str, bytes] | None = None, **info: object) -> None:
    """Do what ALPAMAYO_FAILPOINTS asks at `name` (usually nothing)."""
    if name not in _ACTIVE:
        return
    action, nth = _ACTIVE[name]
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != nth:
            return
    if partial is not None:
        path, data = partial
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")
    if action == "exit":
        os._exit(137)
    if action == "raise":
        raise Failpoint(name)
    if action == "hold":
        marker = os.environ.get("ALPAMAYO_FAILPOINTS_MARKER")
        if marker:
            with open(marker, "a") as f:
                f.write(json.dumps({"name": name, "pid": os.getpid(), **{k: str(v) for k, v in info.items()}}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        while True:
            time.sleep(3600)
    raise ValueError(f"ALPAMAYO_FAILPOINTS: unknown action {action!r} for {name} (hold | exit | enospc | raise)")
