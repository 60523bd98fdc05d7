"""The write side: `StoreWriter` (create / resume / overwrite, a bounded background pool, GPU staging)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import queue
import socket
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from shared import kv_quant
from shared.failpoints import armed, failpoint
from shared.store.commit import _SampleCommitter
from shared.store.format import (
    _WRITER_ID_RE,
    TRAJ_LAYOUT,
    TRAJ_SIZE,
    KVSpec,
    StoreError,
    _nonfinite,
    _root_meta,
    _to_numpy_stored,
    diff_keys,
    normalize_provenance,
    sample_id,
)
from shared.store.location import _list_commit_names, _list_committed, _load_manifests, _Loc, _read_root
from shared.store.nav import nav_arrays, nav_fields, validate_nav
from shared.store.procs import WriterProcess
from shared.store.retry import StoreUnavailableError
from shared.store.sample import CachedSample


class StoreWriter:
    """Appends samples to a store; compression and IO run on a bounded background pool.

    `write()` validates on the caller's thread, then returns as soon as the sample is queued (it blocks
    when `max_pending` samples are in flight, so host memory stays bounded). The writer takes ownership
    of the tensors: do not modify them in place after `write()`. Errors of background writes are raised
    by the next `write()` / `flush()` / `close()`.
    """

    def __init__(self, loc: _Loc, spec: KVSpec, provenance: dict, writer_id: str, workers: int, max_pending: int,
                 processes: int = 0):
        self._loc, self.spec, self.provenance, self.writer_id = loc, spec, provenance, writer_id
        self._committer = _SampleCommitter(loc, spec, writer_id)
        self._procs: list = []
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        if processes:  # each pool thread stages into one process's shared slab, which commits the sample
            self._procs = [WriterProcess(loc, spec, writer_id, i) for i in range(processes)]
            for p in self._procs:
                self._free.put(p)
            workers = processes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"store-writer-{writer_id}")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._committed = _list_committed(loc)  # key -> writer_id of every committed sample (any writer)
        self._mine: set[str] = set()  # keys queued/written by this writer in this session
        self._bytes_logical = 0
        self._bytes_stored = 0
        self.samples_written = 0
        self._closed = False
        self._tls = threading.local()
        self._gpu_slots = threading.Semaphore(2)

    # ---------------------------------------------------------------- create
    @classmethod
    def create(
        cls,
        url: str,
        provenance: dict,
        spec: KVSpec,
        *,
        mode: str = "new",
        writer_id: str = "0",
        storage_options: dict | None = None,
        workers: int = 2,
        max_pending: int = 4,
        processes: int = 0,
    ) -> StoreWriter:
        """Open a store for writing. mode: new (refuse an existing store) | resume (create or continue a
        store with identical provenance and spec) | overwrite (delete what is there first).

        workers: threads that stage, compress and write; processes > 0: that many writer processes do the
        compression and zarr writes instead (one staging thread each), so none of it holds this process's
        GIL (shared/store/procs.py). Concurrent shard writers: all use mode="resume" and distinct writer_ids."""
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode must be new | resume | overwrite, got {mode!r}")
        if not _WRITER_ID_RE.match(str(writer_id)):
            raise ValueError(f"writer_id must match {_WRITER_ID_RE.pattern}, got {writer_id!r}")
        if workers < 1 or max_pending < 1 or processes < 0:
            raise ValueError(f"workers and max_pending must be >= 1 and processes >= 0, got {workers}, {max_pending}, "
                             f"{processes}")
        prov = normalize_provenance(provenance, spec)
        loc = _Loc(url, storage_options)
        meta_path = loc.path("zarr.json")
        exists = loc.fresh().exists(meta_path)
        if mode == "new" and (exists or _nonempty_dir(loc)):
            raise FileExistsError(
                f"a cache already exists at {loc.url}: pass --resume to continue it (same provenance) "
                "or --overwrite to replace it"
            )
        if mode == "overwrite" and loc.fs.exists(loc.root):
            loc.fs.rm(loc.root, recursive=True)
            exists = False
        if mode == "resume" and not exists and _foreign_entries(loc):
            raise StoreError(
                f"{loc.url} exists but is not a cache store (no zarr.json; holds {_foreign_entries(loc)[:5]}): "
                "refusing to write into it"
            )
        if not exists:
            loc.put_atomic(meta_path, _root_meta(spec, prov))
        # Re-read in every mode: also catches a concurrent creator with a different build.
        attrs = _read_root(loc)
        _check_same_build(loc.url, attrs, prov, spec)
        lock = _lock_writer_id(loc, str(writer_id))
        loc.put_atomic(
            loc.path("writers", f"{writer_id}.json"),
            json.dumps({"writer_id": writer_id, "host": socket.gethostname(), "pid": os.getpid(), "mode": mode,
                        "started": _dt.datetime.now(_dt.UTC).isoformat()}, indent=2).encode(),
        )
        w = cls(loc, spec, prov, str(writer_id), workers, max_pending, processes)
        w._id_lock = lock
        return w

    # ---------------------------------------------------------------- public
    @property
    def url(self) -> str:
        return self._loc.url

    def done_keys(self) -> set[str]:
        """Keys committed by any writer (re-listed), plus those this writer has queued."""
        self._committed = _list_committed(self._loc)
        with self._lock:
            return set(self._committed) | set(self._mine)

    @property
    def bytes_logical(self) -> int:
        """Uncompressed bytes of committed samples (KV in kv dtype + hidden + small arrays)."""
        with self._lock:
            return self._bytes_logical

    @property
    def bytes_stored(self) -> int:
        """On-disk/object bytes of committed samples (chunks + metadata + manifest)."""
        with self._lock:
            return self._bytes_stored

    def write(self, s: CachedSample) -> None:
        """Validate `s` now, then quantise/compress/write it in the background.

        CUDA tensors are fine (and fastest): an event recorded here on the current stream orders the
        writer's GPU work (stack or quantise, NaN count, one pinned copy to the host) after the kernels
        that produced them, on the writer's own stream, so the caller goes straight on to its next batch.
        The writer drops its references to the device tensors as soon as they are on the host."""
        self._raise_pending()
        if self._closed:
            raise StoreError("write() after close()")
        _validate_sample(s, self.spec)
        with self._lock:
            if s.key in self._committed or s.key in self._mine:
                raise ValueError(f"sample {s.key!r} is already in {self.url}: skip keys in done_keys()")
            self._mine.add(s.key)
        ready = None
        if s.k.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(s.k.device))
        self._slots.acquire()
        try:
            fut = self._pool.submit(self._write_one, s, ready)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(self._done)
        with self._lock:
            self._futures.append(fut)

    def wait_ready(self) -> None:
        """Block until the writer processes (if any) have started: ~2 s, which a build spends loading the
        VLM anyway; benchmarks call it to keep the start-up off their clock."""
        procs = [self._free.get() for _ in self._procs]  # exclusive: no staging thread talks to them now
        try:
            for p in procs:
                p.wait_ready()
        finally:
            for p in procs:
                self._free.put(p)

    def flush(self) -> None:
        """Block until every queued sample is committed; raise the first background error."""
        while True:
            with self._lock:
                futs, self._futures = self._futures, []
            if not futs:
                break
            for f in futs:
                f.exception()
        self._raise_pending()

    def close(self) -> None:
        """Flush, then write this writer's index snapshot (lets readers skip reading each manifest)."""
        if self._closed:
            return
        try:
            try:
                self.flush()
            finally:
                self._closed = True
                self._pool.shutdown(wait=True)
                self._stop_processes()
            self._write_index()
        finally:  # also when a write failed (e.g. disk full): the shard's lock goes with this writer
            self._unlock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
        else:  # leave committed samples; do not mask the original error
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)  # queued samples never start: a resume redoes them
            self._stop_processes()
            self._unlock()

    def _unlock(self) -> None:
        lock, self._id_lock = getattr(self, "_id_lock", None), None
        if lock is not None:
            lock.close()  # releases the flock

    def _stop_processes(self) -> None:
        for p in self._procs:
            p.close()
        self._procs = []

    # ---------------------------------------------------------------- internals
    def _done(self, fut: Future) -> None:
        self._slots.release()
        if fut.cancelled():  # dropped by __exit__ on an error before it started
            return
        e = fut.exception()
        if e is not None:
            with self._lock:
                self._error = self._error or e

    def _raise_pending(self) -> None:
        with self._lock:
            e, self._error = self._error, None
        if e is not None:
            what = str(e) if isinstance(e, (OSError, StoreError)) else repr(e)
            # an unreachable endpoint, or disk full / permissions / a vanished mount (here or in a writer
            # process, whose errors arrive as text): say what to do next
            if isinstance(e, StoreUnavailableError) or "StoreUnavailableError: " in what:
                then = "rerun with --resume once the store answers again"
            elif isinstance(e, OSError) or "[Errno " in what:
                then = "fix the cause (free space), then rerun with --resume"
            else:
                raise StoreError(f"background write failed: {what}") from e
            raise StoreError(f"writing into {self.url} failed: {what}; the samples committed so far are intact: {then}") from e

    def _staging_stream(self, device: torch.device) -> torch.cuda.Stream:
        """One CUDA stream per writer thread (and device): staging never queues behind the prefill."""
        streams = self._tls.__dict__.setdefault("streams", {})
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)
        return streams[device]

    def _host_arrays(self, s: CachedSample, ready: torch.cuda.Event | None, place=None,
                     ) -> tuple[dict[str, np.ndarray], int, int]:
        """The sample's tensors in stored form on the host -> (arrays, NaN/Inf count, rope_delta).

        Stacking K/V, quantising and counting non-finite values run where the tensors live; CUDA
        tensors then cross to pinned host memory in one asynchronous copy each. `place`, given
        [(name, shape, dtype)], returns host tensors to land them in (a writer process's slab)."""
        spec = self.spec
        dev = s.k.device
        ctx: Any = contextlib.nullcontext()
        if dev.type == "cuda":  # at most two samples in GPU staging at once: quantisation needs fp32 copies
            stream = self._staging_stream(dev)
            stream.wait_event(ready)
            ctx = contextlib.ExitStack()
            ctx.enter_context(self._gpu_slots)
            ctx.enter_context(torch.cuda.stream(stream))
        with ctx:
            t: dict[str, torch.Tensor] = {}
            if spec.quant == "none":
                t["kv"] = torch.stack((s.k, s.v), dim=1)  # (layers, 2, kv_heads, L, head_dim)
            else:
                q = kv_quant.quantize_kv(s.k, s.v, spec.quant)
                t["kv"] = q.codes
                t.update({f"q_{n}": p.contiguous() for n, p in q.params.items()})
            if spec.store_hidden:
                t["hidden"] = s.hidden
            cuda = dev.type == "cuda"
            if cuda:
                bad = sum((~torch.isfinite(x)).sum() for x in (s.k, s.v, t.get("hidden")) if x is not None)
                t["_nonfinite"] = bad.reshape(1)
                t["_rope_delta"] = torch.as_tensor(s.rope_delta, device=dev).reshape(1).to(torch.int64)
            if place is not None:
                dst = place([(n, x.shape, x.dtype) for n, x in t.items()])
            elif cuda:
                dst = {n: torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for n, x in t.items()}
            else:
                dst = None  # CPU tensors, no slab: they are the host arrays already
            host = {n: x.contiguous() if dst is None else dst[n].copy_(x, non_blocking=cuda) for n, x in t.items()}
            if cuda:
                stream.synchronize()
            del t
        arrays = {n: (_to_numpy_stored(x, spec.kv_dtype) if n in ("kv", "hidden") and x.is_floating_point()
                      else x.numpy()) for n, x in host.items() if not n.startswith("_")}
        if cuda:  # the device copies are no longer needed: give their memory back now
            s.k = s.v = s.hidden = s.rope_delta = None
            return arrays, int(host["_nonfinite"][0]), int(host["_rope_delta"][0])
        # on the host, count on the stored form where it still holds the values (bf16 bits: exponent all
        # ones, as verify() does); quantised codes cannot hold NaN, so count those on K and V
        if spec.quant == "none":
            nonfinite = _nonfinite(arrays["kv"], spec.kv_dtype)
        else:
            nonfinite = int((~torch.isfinite(s.k)).sum() + (~torch.isfinite(s.v)).sum())
        if "hidden" in arrays:
            nonfinite += _nonfinite(arrays["hidden"], spec.kv_dtype)
        return arrays, nonfinite, int(s.rope_delta)

    def _write_one(self, s: CachedSample, ready: torch.cuda.Event | None = None) -> None:
        spec = self.spec
        L = int(s.prefix_len)
        logical = (2 * s.k.numel() * spec.itemsize + (s.hidden.numel() * spec.itemsize if spec.store_hidden else 0)
                   + L * 8 + s.thumbs.nbytes + TRAJ_SIZE * 8)
        proc = self._free.get() if self._procs else None
        try:
            arrays, nonfinite, rope_delta = self._host_arrays(s, ready, None if proc is None else proc.place)
            arrays["token_ids"] = s.token_ids.detach().to("cpu").numpy().astype(np.int32)
            arrays["thumbs"] = np.ascontiguousarray(s.thumbs, dtype=np.uint8)
            arrays["traj"] = np.concatenate(
                [np.asarray(getattr(s, n), np.float64).reshape(-1) for n, _ in TRAJ_LAYOUT]
            )
            if spec.navigation:  # Alpamayo 1.5 fields (schema v2); R1 stores never reach here
                fields_nav = nav_fields(s)
                arrays.update(nav_arrays(s, spec))
                logical += arrays["kv_unguided"].nbytes if "kv_unguided" in arrays else 0
            fields = {
                "key": s.key, "prefix_len": L, "rope_delta": rope_delta, "v0": None if s.v0 is None else float(s.v0),
                "clip_id": s.clip_id, "t0_us": int(s.t0_us), "camera_config": s.camera_config, "split": s.split,
                "curvature": {str(k): float(v) for k, v in s.curvature.items()}, "reasoning": s.reasoning or "",
                "camera_names": list(s.camera_names), "nonfinite": nonfinite, "bytes_logical": int(logical),
            }
            if spec.navigation:
                fields.update(fields_nav)
            manifest = (self._committer if proc is None else proc).commit(fields, arrays)
        finally:
            if proc is not None:
                self._free.put(proc)
        with self._lock:
            self._committed[s.key] = self.writer_id
            self._bytes_logical += logical
            self._bytes_stored += manifest["bytes_stored"]
            self.samples_written += 1

    def _write_index(self) -> None:
        mans = _load_manifests(self._loc, writers=[self.writer_id], use_index=True, bad={})  # damaged: left out
        body = json.dumps({"writer_id": self.writer_id, "manifests": mans}, sort_keys=True).encode()
        path = self._loc.path("index", f"{self.writer_id}.json")
        if armed("index_write"):
            failpoint("index_write", partial=(f"{path}.tmp-failpoint", body) if self._loc.local else None)
        self._loc.put_atomic(path, body)


def drop_samples(url: str, keys: Iterable[str], *, storage_options: dict | None = None) -> list[str]:
    """Un-commit samples (damaged ones, named by verify) so that `cache-build --resume` builds them again.

    Removes each key's manifests (every writer's), its entries in the index snapshots, then its arrays;
    in that order, so a kill part-way leaves at worst an orphan directory. Returns the keys dropped.
    Run it while no writer is working on these keys."""
    loc = _Loc(url, storage_options)
    _read_root(loc)
    sids = {sample_id(k): k for k in keys}
    dropped = sorted({sids[s] for w, s in _list_commit_names(loc) if s in sids})
    touched = set()
    for w, s in _list_commit_names(loc):
        if s in sids:
            loc.fs.rm(loc.path("commits", w, f"{s}.json"))
            touched.add(w)
    for w in sorted(touched):
        p = loc.path("index", f"{w}.json")
        try:
            snap = loc.read_json(p)
        except (FileNotFoundError, ValueError):
            continue
        snap["manifests"] = [m for m in snap.get("manifests", []) if m.get("sid") not in sids]
        loc.put_atomic(p, json.dumps(snap, sort_keys=True).encode())
    for s in sids:
        if loc.fresh().exists(loc.path("samples", s)):
            loc.fs.rm(loc.path("samples", s), recursive=True)
    return dropped


def _lock_writer_id(loc: _Loc, writer_id: str):
    """Hold writers/<writer_id>.lock (flock) while this writer lives, so a second build of the same shard
    refuses instead of deleting the first one's half-written samples. The kernel drops the lock when the
    process dies, so a killed build never leaves a stale lock. Local stores only: object stores have no
    lock; there two writers of one id must be kept apart by the launcher (docs/RELIABILITY.md)."""
    if not loc.local:
        return None
    import fcntl

    path = loc.path("writers", f"{writer_id}.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+b")  # noqa: SIM115 - held open for the writer's lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        try:
            who = loc.read_json(loc.path("writers", f"{writer_id}.json"))
            who = f" (pid {who.get('pid')} on {who.get('host')}, started {who.get('started')})"
        except (OSError, ValueError):
            who = ""
        raise StoreError(f"another writer with id {writer_id!r} is writing into {loc.url}{who}: wait for it, or give "
                         "this build another shard (--shard i/N) / writer_id") from None
    return f


def _nonempty_dir(loc: _Loc) -> bool:
    try:
        return loc.fresh().isdir(loc.root) and len(loc.fs.ls(loc.root, detail=False)) > 0
    except FileNotFoundError:
        return False


_OWN_ENTRIES = ("zarr.json", "writers", "commits", "samples", "index")


def _foreign_entries(loc: _Loc) -> list[str]:
    """Entries of the root that a (possibly concurrent) writer of ours would not have made."""
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in loc.fresh().ls(loc.root, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n not in _OWN_ENTRIES and not n.startswith("zarr.json.tmp-"))


def _check_same_build(url: str, attrs: dict, prov: dict, spec: KVSpec) -> None:
    stored_prov = attrs.get("provenance", {})
    stored_spec = attrs.get("spec", {})
    diffs = [*diff_keys(stored_prov, prov), *(f"spec.{k}" for k in diff_keys(stored_spec, spec.to_dict()))]
    if diffs:
        detail = "; ".join(
            f"{k}: stored {_get(stored_prov, stored_spec, k)!r} vs this build {_get(prov, spec.to_dict(), k)!r}"
            for k in diffs
        )
        raise StoreError(
            f"refusing to write into {url}: it was built with a different provenance/spec; differing keys: "
            f"{', '.join(diffs)} ({detail}). Use another cache name, or --overwrite to rebuild it."
        )


def _get(prov: dict, spec: dict, k: str) -> Any:
    return spec.get(k[5:], "<missing>") if k.startswith("spec.") else prov.get(k, "<missing>")


def _validate_sample(s: CachedSample, spec: KVSpec) -> None:
    """Every shape/dtype check before any work, with messages that name the field."""
    def bad(msg: str) -> None:
        raise ValueError(f"sample {getattr(s, 'key', '?')!r}: {msg}")

    if s.key != f"{s.clip_id}@{s.t0_us}:{s.camera_config}":
        bad(f"key must be Sample.key = {s.clip_id}@{s.t0_us}:{s.camera_config}")
    L = int(s.prefix_len)
    want = (spec.num_layers, spec.num_kv_heads, L, spec.head_dim)
    for n in ("k", "v"):
        t = getattr(s, n)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            bad(f"{n} must be a tensor of shape (layers, kv_heads, L, head_dim) = {want}, got {getattr(t, 'shape', t)}")
        if t.dtype != spec.torch_dtype:
            bad(f"{n}.dtype is {t.dtype}, the store's kv_dtype is {spec.kv_dtype}")
    if L <= 0:
        bad("prefix_len must be > 0")
    if tuple(s.token_ids.shape) != (L,) or s.token_ids.dtype not in (torch.int64, torch.int32):
        bad(f"token_ids must be ({L},) int64, got {tuple(s.token_ids.shape)} {s.token_ids.dtype}")
    if s.token_ids.numel() and (int(s.token_ids.min()) < 0 or int(s.token_ids.max()) >= 2**31):
        bad("token_ids out of int32 range")
    if spec.store_hidden:
        h = s.hidden
        if h is None:
            bad("hidden is None but the store keeps hidden states (spec.store_hidden=True)")
        if tuple(h.shape) != (L, spec.hidden_size) or h.dtype != spec.torch_dtype:
            bad(f"hidden must be ({L}, {spec.hidden_size}) {spec.kv_dtype}, got {tuple(h.shape)} {h.dtype}")
    th = np.asarray(s.thumbs)
    want_th = (len(s.camera_names), *spec.thumb_hw, 3)
    if th.dtype != np.uint8 or th.shape != want_th:
        bad(f"thumbs must be (n_cam, h, w, 3) = {want_th} uint8, got {th.shape} {th.dtype}")
    for n, shape in TRAJ_LAYOUT:
        a = np.asarray(getattr(s, n))
        if a.shape != shape:
            bad(f"{n} must have shape {shape}, got {a.shape}")
        if not np.isfinite(a).all():
            bad(f"{n} has NaN/Inf")
    if np.asarray(s.gt_action).dtype != np.float32:
        bad("gt_action must be float32")
    for n in ("clip_id", "camera_config", "split"):
        if not isinstance(getattr(s, n), str) or not getattr(s, n):
            bad(f"{n} must be a non-empty str")
    if not isinstance(s.reasoning, str):
        bad("reasoning must be a str (empty when there is none)")
    if not isinstance(s.curvature, dict) or not all(isinstance(k, str) for k in s.curvature):
        bad("curvature must be a dict[str, float]")
    validate_nav(s, spec, bad)
