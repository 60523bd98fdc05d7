"""Store writer processes: the compression and zarr writes of whole samples, out of the builder's process.

Started as `python -m shared.store_procs ARGS` (shared/store_procs.py, the entry point: a plain
interpreter, not multiprocessing's spawn, which would re-import the caller's main module).

Why: on an H200 a build whose writer only stages K/V to the host keeps the GPU stage at 0.95-0.98x
bare prefill, while the same build writing in-process runs at 1.3-1.8x (docs/PERFORMANCE.md). zarr's
Python work (its event loop, codec pipeline, buffers) holds the GIL the GPU thread needs to launch
kernels, and one process's writer tops out at ~1.5 GB/s. In processes, neither limit applies.

Hand-off: each process owns a slab of shared memory (a memfd: no name in /dev/shm, freed with its last
mapping, so a killed build leaves nothing behind), registered with CUDA as pinned memory so that the
writer's one device-to-host copy lands in it directly. The staging thread that owns the process sends
the sample's fields and where each array lies in the slab; the process writes and commits it and
answers with the manifest. A process dies with its parent (PR_SET_PDEATHSIG) and checks once more
before each commit, so a killed build never gains a commit afterwards. That signal follows the thread
that started the process: open the StoreWriter on a thread that outlives it (the main thread does).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
from multiprocessing import reduction
from multiprocessing.connection import Connection

import numpy as np
import torch

from shared.store.commit import _SampleCommitter
from shared.store.format import KVSpec, StoreError
from shared.store.location import _Loc

ALIGN = 256  # bytes: every array in a slab starts aligned (CUDA copies, numpy views of any dtype)


class WriterProcess:
    """One writer process and its slab. Used by one staging thread at a time."""

    def __init__(self, loc, spec, writer_id: str, index: int):
        if not hasattr(os, "memfd_create"):
            raise ValueError("store writer processes need Linux (memfd_create); write with threads (processes=0, "
                             "cache-build --writer-processes 0)")
        # a plain interpreter on `python -m shared.store_procs` (not multiprocessing's spawn, which would
        # re-import the caller's main module in every process): it starts in ~2 s, never touches CUDA
        ours, theirs = socket.socketpair()
        args = json.dumps({"url": loc.url, "storage_options": loc.storage_options, "spec": spec.to_dict(),
                           "writer_id": writer_id, "parent": os.getpid(), "fd": theirs.fileno()})
        self.name = f"store-writer-{writer_id}-{index}"
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen([sys.executable, "-m", "shared.store_procs", args], pass_fds=(theirs.fileno(),),
                                     cwd=root)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.slab: torch.Tensor | None = None  # (size,) uint8 over the mapping
        self._map: mmap.mmap | None = None
        self._registered = False
        self._ready = False

    def wait_ready(self) -> None:
        """Block until the process has imported what it needs and answered."""
        if not self._ready:
            self._expect("ready")
            self._ready = True

    def _expect(self, what: str):
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError) as e:
            raise StoreError(f"store writer process {self.name} exited (code {self.proc.poll()})") from e
        if kind == "err":
            raise StoreError(payload)
        if kind != what:
            raise StoreError(f"{self.name}: expected {what!r}, got {kind!r}")
        return payload

    # ---------------------------------------------------------------- parent side
    def place(self, items: list[tuple[str, tuple, torch.dtype]]) -> dict[str, torch.Tensor]:
        """Host tensors in this process's slab for [(name, shape, dtype)] (the slab grows to fit)."""
        offsets, end = {}, 0
        for name, shape, dtype in items:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            offsets[name] = (end, nbytes)
            end += -(-nbytes // ALIGN) * ALIGN
        if self.slab is None or self.slab.numel() < end:
            self._grow(end + end // 4)
        return {name: self.slab[o:o + nb].view(dtype).view(shape)
                for (name, shape, dtype), (o, nb) in zip(items, offsets.values())}

    def commit(self, fields: dict, arrays: dict[str, np.ndarray]) -> dict:
        """Send one sample (arrays in the slab go by offset, others inline) -> its manifest."""
        self.wait_ready()
        base, size = (0, 0) if self.slab is None else (self.slab.data_ptr(), self.slab.numel())
        placed, inline = {}, {}
        for name, a in arrays.items():
            addr = a.__array_interface__["data"][0]
            if a.flags.c_contiguous and base <= addr and addr + a.nbytes <= base + size:
                placed[name] = (addr - base, a.shape, a.dtype.str)
            else:
                inline[name] = a
        try:
            self.conn.send(("write", fields, placed, inline))
        except OSError as e:
            raise StoreError(f"store writer process {self.name} exited (code {self.proc.poll()})") from e
        try:
            return self._expect("ok")
        except StoreError as e:
            raise StoreError(f"writing {fields.get('key')!r} in {self.name} failed: {e}") from e

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        self._release()

    def _grow(self, size: int) -> None:
        self._release()
        fd = os.memfd_create("alpamayo-store-slab", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            self.wait_ready()
            self.conn.send(("slab", size))
            reduction.send_handle(self.conn, fd, self.proc.pid)
        finally:
            os.close(fd)
        self.slab = torch.frombuffer(self._map, dtype=torch.uint8)
        if torch.cuda.is_available():  # pinned: the writer's device->host copy lands here asynchronously
            self._registered = int(torch.cuda.cudart().cudaHostRegister(self.slab.data_ptr(), size, 0)) == 0

    def _release(self) -> None:
        if self.slab is not None and self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.slab.data_ptr())
        self.slab, self._map, self._registered = None, None, False  # the mapping closes with its last view


# -------------------------------------------------------------------- child side
def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent went before the signal was armed
        os._exit(0)


def _serve(conn: Connection, url: str, storage_options: dict | None, spec: dict, writer_id: str, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)
    committer = _SampleCommitter(_Loc(url, storage_options), KVSpec.from_dict(spec), writer_id)

    def parent_alive() -> None:
        if os.getppid() != parent:
            raise SystemExit(0)

    conn.send(("ready", None))
    slab = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        if msg[0] == "slab":
            fd = reduction.recv_handle(conn)
            slab = np.frombuffer(mmap.mmap(fd, msg[1]), dtype=np.uint8)
            os.close(fd)
            continue
        _, fields, placed, inline = msg
        try:
            arrays = {n: slab[o:o + int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
                      for n, (o, shape, dt) in placed.items()}
            arrays.update(inline)
            reply = ("ok", committer.commit(fields, arrays, before_commit=parent_alive))
        except Exception as e:  # reported to the staging thread, which raises it in the builder
            reply = ("err", f"{type(e).__name__}: {e}")
        conn.send(reply)


def main(argv: list[str]) -> None:
    """Child entry (shared/store_procs.py): argv[0] is the JSON written by WriterProcess."""
    a = json.loads(argv[0])
    _serve(Connection(a["fd"]), a["url"], a["storage_options"], a["spec"], a["writer_id"], a["parent"])
