"""The KV cache store: the on-disk contract between `cache-build` (writes) and `head-train` (reads).

One Zarr v3 store per build, local (`cache/<name>/`) or any fsspec URL (`s3://bucket/x`). Layout and
the measurements behind it are in docs/CACHE_FORMAT.md; in short:

    <root>/zarr.json                      root group; attributes = format, schema_version, provenance, spec
    <root>/writers/<writer_id>.json       who wrote (one file per writer process, never shared)
    <root>/samples/<sid>/                 one Zarr group per sample (sid = escaped sample key)
        kv        (layers, 2, kv_heads, L, Dc)  uint16 (bf16 bits) | float32 | int8 | uint8 (int4 packed)
        q_<name>  quantisation scales / zeros, (layers, ...)           [quant != none]
        hidden    (L, hidden_size) uint16 | float32                      [spec.store_hidden]
        token_ids (L,) int32;  thumbs (n_cam, h, w, 3) uint8;  traj (1088,) float64 (TRAJ_LAYOUT)
    <root>/commits/<writer_id>/<sid>.json the per-sample manifest, written LAST and atomically:
                                          a sample exists iff its manifest exists
    <root>/index/<writer_id>.json         snapshot of that writer's manifests (open() speed-up only)

Why this shape: one array per sample needs no read-modify-write, so a killed writer can only leave an
orphan directory without a manifest (invisible; rewritten on resume), and N writers with disjoint
keys never touch a shared file (each writes its own commits/<writer_id>/). Readers list commits/.

    w = StoreWriter.create("cache/run1", provenance, spec, mode="resume", writer_id="0")
    for s in samples: (s.key in w.done_keys()) or w.write(cached)   # async: compression on a pool
    w.close()
    st = Store.open("cache/run1"); x = st.read(0, layers=range(4), device="cuda")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import queue
import re
import socket
import threading
import uuid
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync as zarr_sync

from shared import kv_quant
from shared.sample import NUM_FUTURE, NUM_HISTORY

FORMAT_NAME = "alpamayo-headtune-kvcache"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
DEFAULT_CACHE_ROOT = "cache"
KV_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CODECS = ("zstd", "blosc-lz4", "none")
# Keys every build must state (None allowed when truly unknown); schema_version / kv_dtype / quant are
# filled in from the spec. Extra keys are kept and compared too.
REQUIRED_PROVENANCE_KEYS = (
    "checkpoint",  # model repo id + revision / file hash the VLM was loaded from
    "head_config_hash",  # hash of the expert / head config the cache is meant for
    "processor",  # processor identity (repo + revision, min/max pixels)
    "prefix_mode",  # e.g. "sft-no-cot" | "given-cot" | "generated-cot"
    "dataset_revision",
    "code_version",  # git describe of this repo
)
# Flat float64 vector `traj`: name, shape, in this order (gt_action is float32, exact in float64).
TRAJ_LAYOUT: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("ego_history_xyz", (NUM_HISTORY, 3)),
    ("ego_history_rot", (NUM_HISTORY, 3, 3)),
    ("ego_future_xyz", (NUM_FUTURE, 3)),
    ("ego_future_rot", (NUM_FUTURE, 3, 3)),
    ("gt_action", (NUM_FUTURE, 2)),
)
TRAJ_SIZE = sum(math.prod(s) for _, s in TRAJ_LAYOUT)
_WRITER_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SAFE_CHARS = re.compile(r"[A-Za-z0-9._@-]")


class StoreError(RuntimeError):
    """A store cannot be opened or written as asked (missing, wrong schema, provenance mismatch)."""


# ============================================================================ spec / provenance
@dataclass(frozen=True)
class KVSpec:
    """What every sample of a store holds; fixed at create time."""

    num_layers: int  # VLM text layers cached (36 for Qwen3-VL-8B)
    num_kv_heads: int  # 8
    head_dim: int  # 128
    hidden_size: int  # 4096
    kv_dtype: str = "bfloat16"  # dtype of K/V/hidden as produced and returned: bfloat16 | float32
    quant: str = "none"  # none | int8 | int4 (KV only; hidden is never quantised)
    store_hidden: bool = True  # keep last-layer hidden states of the prefix (L, hidden)
    codec: str = "zstd"  # lossless codec of KV / hidden: zstd (level 1) | blosc-lz4 (bitshuffle) | none
    thumb_hw: tuple[int, int] = (72, 128)  # t0 thumbnail size per camera
    chunk_mb: float = 8.0  # target uncompressed KV chunk size (MB); chunks are whole layers
    shard: bool = False  # pack each sample's KV / hidden into one shard object (object stores)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thumb_hw", tuple(int(x) for x in self.thumb_hw))
        for f in ("num_layers", "num_kv_heads", "head_dim", "hidden_size"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"KVSpec.{f} must be > 0, got {getattr(self, f)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"KVSpec.kv_dtype must be one of {tuple(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.quant not in kv_quant.QUANT_METHODS:
            raise ValueError(f"KVSpec.quant must be one of {kv_quant.QUANT_METHODS}, got {self.quant!r}")
        if self.quant == "int4":
            kv_quant.int4_group(self.head_dim)
        if self.codec not in CODECS:
            raise ValueError(f"KVSpec.codec must be one of {CODECS}, got {self.codec!r}")
        if len(self.thumb_hw) != 2 or min(self.thumb_hw) <= 0:
            raise ValueError(f"KVSpec.thumb_hw must be (h, w) > 0, got {self.thumb_hw}")
        if not self.chunk_mb > 0:
            raise ValueError(f"KVSpec.chunk_mb must be > 0, got {self.chunk_mb}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.kv_dtype]

    @property
    def itemsize(self) -> int:
        return 2 if self.kv_dtype == "bfloat16" else 4

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["thumb_hw"] = list(self.thumb_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KVSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise StoreError(f"spec has unknown fields {sorted(unknown)}: written by a newer version?")
        return cls(**d)


def normalize_provenance(provenance: dict, spec: KVSpec) -> dict:
    """Validate a build's provenance and add the spec-derived keys (JSON-normalised, sorted)."""
    if not isinstance(provenance, dict):
        raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
    missing = [k for k in REQUIRED_PROVENANCE_KEYS if k not in provenance]
    if missing:
        raise ValueError(f"provenance lacks required keys {missing} (None is allowed when unknown)")
    auto = {"schema_version": SCHEMA_VERSION, "kv_dtype": spec.kv_dtype, "quant": spec.quant}
    for k, val in auto.items():
        if k in provenance and provenance[k] != val:
            raise ValueError(f"provenance[{k!r}]={provenance[k]!r} contradicts the spec ({val!r})")
    try:
        out = json.loads(json.dumps({**provenance, **auto}, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"provenance must be JSON-serialisable: {e}") from None
    return out


def diff_keys(stored: dict, new: dict) -> list[str]:
    """Sorted keys whose values differ (or exist on one side only)."""
    return sorted(k for k in set(stored) | set(new) if stored.get(k, "<missing>") != new.get(k, "<missing>"))


# ============================================================================ the sample record
@dataclass
class CachedSample:
    """One cached training sample, as written by cache-build and read back by head-train."""

    key: str  # Sample.key = f"{clip_id}@{t0_us}:{camera_config}"
    k: torch.Tensor  # (layers, kv_heads, L, head_dim), kv dtype; post-RoPE keys of the prefix
    v: torch.Tensor  # (layers, kv_heads, L, head_dim), kv dtype
    prefix_len: int  # L: tokens up to and including <|traj_future_start|>
    rope_delta: int | torch.Tensor  # Qwen3-VL rope_deltas of the sample (a 0-d device tensor until written)
    token_ids: torch.Tensor  # (L,) int64
    hidden: torch.Tensor | None  # (L, hidden_size) kv dtype, last layer; None when not stored
    thumbs: np.ndarray  # (n_cam, h, w, 3) uint8, t0 frame of each camera
    ego_history_xyz: np.ndarray  # (16, 3) float64
    ego_history_rot: np.ndarray  # (16, 3, 3) float64
    ego_future_xyz: np.ndarray  # (64, 3) float64
    ego_future_rot: np.ndarray  # (64, 3, 3) float64
    gt_action: np.ndarray  # (64, 2) float32, normalised (accel, curvature)
    v0: float | None
    clip_id: str
    t0_us: int
    camera_config: str
    split: str
    curvature: dict[str, float]
    reasoning: str
    camera_names: tuple[str, ...]
    layers: tuple[int, ...] | None = None  # which VLM layers k/v hold when read with layers=...; None = all

    @classmethod
    def from_sample(
        cls,
        sample: Any,  # shared.sample.Sample
        *,
        k: torch.Tensor,
        v: torch.Tensor,
        rope_delta: int | torch.Tensor,
        token_ids: torch.Tensor,
        hidden: torch.Tensor | None,
        gt_action: np.ndarray,
        v0: float | None = None,
        reasoning: str = "",
        curvature: dict[str, float] | None = None,
        thumb_hw: tuple[int, int] = (72, 128),
        thumbs: np.ndarray | None = None,
    ) -> CachedSample:
        """Build from a shared.sample.Sample plus the VLM outputs (thumbnails made here unless given).

        k, v, hidden and rope_delta may stay on the GPU: the writer stages them off the caller's thread."""
        return cls(
            key=sample.key, k=k, v=v, prefix_len=int(k.shape[2]),
            rope_delta=rope_delta if isinstance(rope_delta, torch.Tensor) else int(rope_delta),
            token_ids=token_ids, hidden=hidden,
            thumbs=make_thumbnails(sample.images, thumb_hw) if thumbs is None else thumbs,
            ego_history_xyz=sample.ego_history_xyz, ego_history_rot=sample.ego_history_rot,
            ego_future_xyz=sample.ego_future_xyz, ego_future_rot=sample.ego_future_rot,
            gt_action=np.asarray(gt_action, np.float32), v0=v0, clip_id=sample.clip_id,
            t0_us=int(sample.t0_us), camera_config=sample.camera_config, split=sample.split,
            curvature=dict(curvature if curvature is not None else sample.meta.get("curvature", {})),
            reasoning=reasoning or "", camera_names=tuple(sample.camera_names),
        )


def make_thumbnails(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """images (n_cam, n_frames, 3, H, W) uint8 -> (n_cam, h, w, 3) uint8 of the last (t0) frame."""
    x = torch.as_tensor(np.asarray(images)[:, -1]).float()  # (n_cam, 3, H, W)
    y = torch.nn.functional.interpolate(x, size=tuple(hw), mode="area")
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def sample_id(key: str) -> str:
    """Filesystem/object-store safe, injective name for a key: unsafe chars become ~xx (utf-8 hex)."""
    out = []
    for ch in key:
        out.append(ch if _SAFE_CHARS.fullmatch(ch) else "".join(f"~{b:02x}" for b in ch.encode()))
    sid = "".join(out)
    return "~" + sid if sid.startswith((".", "_")) or not sid else sid


# ============================================================================ size estimate
# Measured lossless ratios (kv-storage.md §3.2/3.3 on bf16; bench/bench_store_io.py here).
_RATIO = {
    ("bfloat16", "none", "zstd"): 1.26, ("bfloat16", "none", "blosc-lz4"): 1.20,
    ("float32", "none", "zstd"): 1.10, ("float32", "none", "blosc-lz4"): 1.10,
    ("bfloat16", "int8", "zstd"): 1.08, ("float32", "int8", "zstd"): 1.08,
    ("bfloat16", "int4", "zstd"): 1.02, ("float32", "int4", "zstd"): 1.02,
}


@dataclass(frozen=True)
class SizeEstimate:
    logical_bytes: int  # KV in kv dtype + hidden + small arrays, uncompressed
    kv_logical_bytes: int  # K+V alone in kv dtype
    stored_bytes: int  # estimate after quantisation and the lossless codec
    files: int  # objects per sample (metadata + chunks + manifest)


def _kv_layers_per_chunk(spec: KVSpec, L: int) -> int:
    """Largest divisor of num_layers whose chunk stays <= chunk_mb (at least one layer)."""
    dc = spec.head_dim // 2 if spec.quant == "int4" else spec.head_dim
    item = spec.itemsize if spec.quant == "none" else 1
    layer_bytes = 2 * spec.num_kv_heads * L * dc * item
    best = 1
    for d in range(1, spec.num_layers + 1):
        if spec.num_layers % d == 0 and d * layer_bytes <= spec.chunk_mb * 1e6:
            best = d
    return best


def _hidden_tokens_per_chunk(spec: KVSpec, L: int) -> int:
    return max(1, min(L, int(spec.chunk_mb * 1e6 // (spec.hidden_size * spec.itemsize))))


def estimate_sample_bytes(spec: KVSpec, prefix_len: int, n_cam: int = 4, reasoning_chars: int = 0) -> SizeEstimate:
    """Bytes one sample of `prefix_len` tokens takes (for cache-build --dry-run)."""
    L = int(prefix_len)
    if L <= 0:
        raise ValueError(f"prefix_len must be > 0, got {prefix_len}")
    kv_logical = 2 * spec.num_layers * spec.num_kv_heads * L * spec.head_dim * spec.itemsize
    hidden = L * spec.hidden_size * spec.itemsize if spec.store_hidden else 0
    small = L * 8 + n_cam * spec.thumb_hw[0] * spec.thumb_hw[1] * 3 + TRAJ_SIZE * 8
    manifest = 2000 + reasoning_chars
    if spec.quant == "none":
        kv_stored = kv_logical
    else:
        shape = kv_quant.code_shape(spec.quant, spec.num_layers, spec.num_kv_heads, L, spec.head_dim)
        kv_stored = math.prod(shape)
    ratio = 1.0 if spec.codec == "none" else _RATIO.get((spec.kv_dtype, spec.quant, spec.codec), 1.05)
    params = sum(
        math.prod(s) * np.dtype(dt).itemsize
        for s, dt in kv_quant.param_shapes(spec.quant, spec.num_layers, spec.num_kv_heads, L, spec.head_dim).values()
    )
    h_ratio = 1.0 if spec.codec == "none" else _RATIO.get((spec.kv_dtype, "none", spec.codec), 1.05)
    stored = int(kv_stored / ratio + params + hidden / h_ratio + small / 2 + manifest)
    n_kv_chunks = 1 if spec.shard else spec.num_layers // _kv_layers_per_chunk(spec, L)
    n_h_chunks = 0 if not spec.store_hidden else (1 if spec.shard else -(-L // _hidden_tokens_per_chunk(spec, L)))
    n_arrays = 4 + len(kv_quant.param_shapes(spec.quant, 1, 1, 1, spec.head_dim)) + int(spec.store_hidden)
    files = 1 + n_arrays * 2 - 2 - int(spec.store_hidden) + n_kv_chunks + n_h_chunks + 1
    return SizeEstimate(kv_logical + hidden + small, kv_logical, stored, files)


# ============================================================================ location helpers
class _Loc:
    """An fsspec filesystem + root path, and how to make per-sample zarr stores under it."""

    def __init__(self, url: str, storage_options: dict | None):
        self.storage_options = dict(storage_options or {})
        self.fs, path = fsspec.core.url_to_fs(str(url), **self.storage_options)
        self.local = "file" in _protocols(self.fs)
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")
        self.url = self.root if self.local else self.fs.unstrip_protocol(self.root)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def sample_store(self, sid: str, read_only: bool = False) -> zarr.abc.store.Store:
        if self.local:
            return zarr.storage.LocalStore(self.path("samples", sid), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url + "/samples/" + sid, storage_options=self.storage_options or None, read_only=read_only
        )

    def put_atomic(self, path: str, data: bytes) -> None:
        """Whole-object write readers never see half of: tmp + rename locally, a single PUT elsewhere."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def fresh(self) -> fsspec.AbstractFileSystem:
        """The filesystem with listing caches dropped (other processes write here too)."""
        self.fs.invalidate_cache()
        return self.fs

    def read_json(self, path: str) -> dict:
        return json.loads(self.fs.cat_file(path))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _root_meta(spec: KVSpec, provenance: dict) -> bytes:
    attrs = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "provenance": provenance, "spec": spec.to_dict()}
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}, sort_keys=True, indent=2).encode()


def _read_root(loc: _Loc) -> dict:
    """Root attributes after checking format and schema version."""
    p = loc.path("zarr.json")
    if not loc.fresh().exists(p):
        raise FileNotFoundError(
            f"no cache at {loc.url}: run `cache-build --out {loc.url} ...` first (or check the path / URL)"
        )
    try:
        attrs = loc.read_json(p).get("attributes", {})
    except (ValueError, OSError) as e:
        raise StoreError(f"{p} is not readable JSON: {e}") from None
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{loc.url} is a zarr group but not a {FORMAT_NAME} store (format={attrs.get('format')!r})")
    ver = attrs.get("schema_version")
    if ver not in SUPPORTED_SCHEMA_VERSIONS:
        raise StoreError(
            f"{loc.url} has schema_version {ver!r}; this code reads {SUPPORTED_SCHEMA_VERSIONS}: "
            "upgrade alpamayo-headtune or rebuild the cache"
        )
    return attrs


def _compressors(codec: str) -> Any:
    if codec == "zstd":
        return ZstdCodec(level=1)
    if codec == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    return None


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


class _CountingStore(zarr.storage.WrapperStore):
    """A fresh sample directory's store that adds up the bytes written through it.

    Every key of a sample is written once and whole, so the sum equals what a `du` of the directory
    finds afterwards, without listing it again."""

    def __init__(self, store: zarr.abc.store.Store):
        super().__init__(store)
        self.nbytes = 0

    async def set(self, key: str, value: Any) -> None:
        await self._store.set(key, value)
        self.nbytes += len(value)


@dataclass(frozen=True)
class _ArrayLayout:
    """zarr's metadata of one array of a sample, and the documents zarr.create_array writes for it."""

    metadata: Any  # zarr ArrayV3Metadata
    docs: dict[str, Any]  # store key -> Buffer: "<name>/zarr.json" and the group's "zarr.json"
    rows: int  # rows (axis 0) of one stored chunk, or of one shard when sharded


def _nonfinite(a: np.ndarray, kv_dtype: str | None) -> int:
    """Count NaN/Inf; `kv_dtype == 'bfloat16'` means a holds bf16 bit patterns (uint16)."""
    if a.dtype == np.uint16 and kv_dtype == "bfloat16":
        return int(np.count_nonzero((a & 0x7F80) == 0x7F80))
    if a.dtype.kind == "f":
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    return 0


def _to_numpy_stored(t: torch.Tensor, kv_dtype: str) -> np.ndarray:
    """kv-dtype tensor -> numpy in its stored form (bf16 -> its uint16 bit pattern)."""
    t = t.detach().to("cpu").contiguous()
    if kv_dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _from_stored(a: np.ndarray, kv_dtype: str) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if kv_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ============================================================================ writer
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
            from shared.store_procs import WriterProcess

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
        GIL (shared/store_procs.py). Concurrent shard writers: all use mode="resume" and distinct writer_ids."""
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
        loc.put_atomic(
            loc.path("writers", f"{writer_id}.json"),
            json.dumps({"writer_id": writer_id, "host": socket.gethostname(), "pid": os.getpid(), "mode": mode,
                        "started": _dt.datetime.now(_dt.UTC).isoformat()}, indent=2).encode(),
        )
        return cls(loc, spec, prov, str(writer_id), workers, max_pending, processes)

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
            self.flush()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._stop_processes()
        self._write_index()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
        else:  # leave committed samples; do not mask the original error
            self._closed = True
            self._pool.shutdown(wait=True)
            self._stop_processes()

    def _stop_processes(self) -> None:
        for p in self._procs:
            p.close()
        self._procs = []

    # ---------------------------------------------------------------- internals
    def _done(self, fut: Future) -> None:
        self._slots.release()
        e = fut.exception()
        if e is not None:
            with self._lock:
                self._error = self._error or e

    def _raise_pending(self) -> None:
        with self._lock:
            e, self._error = self._error, None
        if e is not None:
            raise StoreError(f"background write failed: {e!r}") from e

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
            fields = {
                "key": s.key, "prefix_len": L, "rope_delta": rope_delta, "v0": None if s.v0 is None else float(s.v0),
                "clip_id": s.clip_id, "t0_us": int(s.t0_us), "camera_config": s.camera_config, "split": s.split,
                "curvature": {str(k): float(v) for k, v in s.curvature.items()}, "reasoning": s.reasoning or "",
                "camera_names": list(s.camera_names), "nonfinite": nonfinite, "bytes_logical": int(logical),
            }
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
        mans = _load_manifests(self._loc, writers=[self.writer_id], use_index=True)
        body = json.dumps({"writer_id": self.writer_id, "manifests": mans}, sort_keys=True).encode()
        self._loc.put_atomic(self._loc.path("index", f"{self.writer_id}.json"), body)


class _SampleCommitter:
    """Writes one sample's arrays under samples/<sid>/, then its manifest: the commit point.

    Runs on the writer's threads, or inside a writer process (shared/store_procs.py)."""

    def __init__(self, loc: _Loc, spec: KVSpec, writer_id: str):
        self.loc, self.spec, self.writer_id = loc, spec, writer_id
        self._layouts: dict[tuple, _ArrayLayout] = {}  # (name, shape, dtype) -> zarr metadata; see _layout

    def commit(self, fields: dict, arrays: dict[str, np.ndarray], before_commit=None) -> dict:
        """fields: the manifest's per-sample entries; arrays: name -> stored form. -> the manifest.
        `before_commit()` runs last before the commit (a writer process checks its parent lives)."""
        loc = self.loc
        sid = sample_id(fields["key"])
        L = int(fields["prefix_len"])
        sdir = loc.path("samples", sid)
        if loc.fresh().exists(sdir):  # orphan of a killed writer: start clean
            loc.fs.rm(sdir, recursive=True)
        zs = _CountingStore(loc.sample_store(sid))
        layouts = {name: self._layout(name, a, L) for name, a in arrays.items()}
        crcs = zarr_sync(_put_arrays(zs, arrays, layouts))
        meta = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "crc32": c}
                for (name, a), c in zip(arrays.items(), crcs)}
        stored = zs.nbytes
        manifest = {"schema_version": SCHEMA_VERSION, "sid": sid, "writer_id": self.writer_id, **fields,
                    "arrays": meta, "bytes_stored": stored, "written": _dt.datetime.now(_dt.UTC).isoformat()}
        body = json.dumps(manifest, sort_keys=True).encode()
        manifest["bytes_stored"] = stored + len(body)
        body = json.dumps(manifest, sort_keys=True).encode()
        if before_commit is not None:
            before_commit()
        loc.put_atomic(loc.path("commits", self.writer_id, f"{sid}.json"), body)  # the commit point
        return manifest

    def _layout(self, name: str, a: np.ndarray, L: int) -> _ArrayLayout:
        """zarr's metadata for array `name` of a sample, made by zarr.create_array in memory once per shape.

        Creating every array on the sample's store cost 3-5 ms each, mostly on zarr's one event-loop
        thread that all writer threads share (checks for an existing node and group, metadata built and
        serialised anew, four file operations). The cached documents are the bytes create_array writes."""
        key = (name, a.shape, a.dtype.str)
        lay = self._layouts.get(key)
        if lay is not None:
            return lay
        spec = self.spec
        kw: dict[str, Any] = {"compressors": ZstdCodec(level=1), "chunks": a.shape}
        if name == "kv":
            kw = {"compressors": _compressors(spec.codec), "chunks": (_kv_layers_per_chunk(spec, L), *a.shape[1:])}
            if spec.shard:
                kw.update(chunks=(1, *a.shape[1:]), shards=a.shape)
        elif name == "hidden":
            ht = _hidden_tokens_per_chunk(spec, L)
            kw = {"compressors": _compressors(spec.codec), "chunks": (ht, a.shape[1])}
            if spec.shard:
                kw.update(shards=(-(-L // ht) * ht, a.shape[1]))
        docs: dict[str, Any] = {}
        z = zarr.create_array(zarr.storage.MemoryStore(docs), name=name, shape=a.shape, dtype=a.dtype, fill_value=0,
                              **kw, chunk_key_encoding={"name": "default", "separator": "."},
                              attributes=_array_attrs(name, spec))
        lay = _ArrayLayout(z.metadata, docs, (z.shards or z.chunks)[0])
        if len(self._layouts) >= 256:  # many distinct prefix lengths: keep the cache small
            self._layouts.clear()
        self._layouts[key] = lay
        return lay


async def _put_arrays(zs: _CountingStore, arrays: dict[str, np.ndarray], layouts: dict[str, _ArrayLayout]) -> list[int]:
    """Write a sample's arrays in one trip to zarr's event loop; returns their crc32s, in order.

    One trip, not two per array: each is a GIL hand-over to and from the loop thread, and those cost most
    when the main thread is busy launching kernels. Every chunk (shard) is written by its own setitem: a
    whole-array setitem made zarr allocate and copy each chunk of a multi-chunk array on the loop thread.
    write_empty_chunks: zarr also skips its all-equal scan of each chunk, which ran on that thread too.
    The checksums run beside the compression, as one job of the loop's pool (zlib.crc32 releases the GIL)."""
    docs = {k: v for lay in layouts.values() for k, v in lay.docs.items()}  # the group's zarr.json once
    jobs = [zs.set(k, v) for k, v in docs.items()]
    for name, a in arrays.items():
        lay = layouts[name]
        z = zarr.AsyncArray(lay.metadata, zarr.storage.StorePath(zs, name), config={"write_empty_chunks": True})
        jobs += [z.setitem(slice(i, i + lay.rows), a[i:i + lay.rows]) for i in range(0, a.shape[0], lay.rows)]
    crcs = asyncio.to_thread(lambda: [_crc(a) for a in arrays.values()])
    out = await asyncio.gather(crcs, *jobs, return_exceptions=True)  # nothing still in flight on error
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out[0]


def _array_attrs(name: str, spec: KVSpec) -> dict:
    if name == "kv":
        return {"axes": ["layer", "kv(0=K,1=V)", "kv_head", "token", "channel"], "kv_dtype": spec.kv_dtype,
                "quant": spec.quant, "stored_as": "uint16 bf16 bits" if spec.kv_dtype == "bfloat16" and spec.quant == "none" else None}
    if name == "hidden":
        return {"axes": ["token", "channel"], "kv_dtype": spec.kv_dtype}
    if name == "traj":
        return {"layout": [[n, list(s)] for n, s in TRAJ_LAYOUT]}
    return {}


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


# ============================================================================ manifests
def _list_committed(loc: _Loc) -> dict[str, str]:
    """key -> writer_id of every committed sample (from names only; keys are recovered from the sids)."""
    out: dict[str, str] = {}
    for wid, sid in _list_commit_names(loc):
        out.setdefault(unescape_sid(sid), wid)
    return out


def _list_commit_names(loc: _Loc, writers: Iterable[str] | None = None) -> list[tuple[str, str]]:
    base = loc.path("commits")
    if not loc.fresh().exists(base):
        return []
    names: list[tuple[str, str]] = []
    for p in loc.fs.find(base):
        rel = p[len(base.rstrip("/")) + 1:] if p.startswith(base) else p.split("/commits/", 1)[-1]
        parts = rel.split("/")
        if len(parts) == 2 and parts[1].endswith(".json"):
            names.append((parts[0], parts[1][:-5]))
    if writers is not None:
        ws = set(writers)
        names = [x for x in names if x[0] in ws]
    return sorted(names)


def unescape_sid(sid: str) -> str:
    """Inverse of sample_id()."""
    if sid.startswith("~") and not re.match(r"~[0-9a-f]{2}", sid):
        sid = sid[1:]
    raw = bytearray()
    i = 0
    while i < len(sid):
        if sid[i] == "~" and re.fullmatch(r"[0-9a-f]{2}", sid[i + 1:i + 3] or "x"):
            raw.append(int(sid[i + 1:i + 3], 16))
            i += 3
        else:
            raw += sid[i].encode()
            i += 1
    return raw.decode()


def _load_manifests(loc: _Loc, writers: Iterable[str] | None = None, use_index: bool = True) -> list[dict]:
    """All committed manifests (one per commit file), using index snapshots where they are current."""
    names = _list_commit_names(loc, writers)
    have: dict[tuple[str, str], dict] = {}
    if use_index:
        for wid in sorted({w for w, _ in names}):
            p = loc.path("index", f"{wid}.json")
            try:
                snap = loc.read_json(p)
            except (FileNotFoundError, ValueError):
                continue
            for m in snap.get("manifests", []):
                have[(m["writer_id"], m["sid"])] = m
    todo = [x for x in names if x not in have]
    if todo:
        paths = [loc.path("commits", w, f"{s}.json") for w, s in todo]
        blobs = loc.fs.cat(paths) if len(paths) > 1 else {paths[0]: loc.fs.cat_file(paths[0])}
        by_path = {_strip(loc, p): b for p, b in blobs.items()}
        for (w, s), p in zip(todo, paths):
            have[(w, s)] = json.loads(by_path[_strip(loc, p)])
    return [have[x] for x in names]


def _strip(loc: _Loc, p: str) -> str:
    return p.rsplit("/commits/", 1)[-1]


# ============================================================================ reader
@dataclass
class VerifyReport:
    url: str
    samples: int = 0
    checked_data: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        head = f"verify {self.url}: {self.samples} samples, {'OK' if self.ok else f'{len(self.errors)} ERRORS'}"
        lines = [head, *(f"  ERROR {e}" for e in self.errors), *(f"  warn  {w}" for w in self.warnings)]
        return "\n".join(lines)


class Store:
    """Read side. Samples are ordered by key (so index i is the same whatever the writers' timing).

    One Store per DataLoader worker process; do not share one across threads that read concurrently."""

    def __init__(self, loc: _Loc, attrs: dict, manifests: list[dict], duplicates: dict[str, list[str]]):
        self._loc = loc
        self.schema_version: int = attrs["schema_version"]
        self.provenance: dict = attrs["provenance"]
        self.spec: KVSpec = KVSpec.from_dict(attrs["spec"])
        self._attrs = attrs
        self._manifests = manifests
        self._pos = {m["key"]: i for i, m in enumerate(manifests)}
        self._duplicates = duplicates

    @classmethod
    def open(cls, url: str, *, storage_options: dict | None = None) -> Store:
        """Open a store; refuses a missing store, another format, or an unknown schema version."""
        loc = _Loc(url, storage_options)
        attrs = _read_root(loc)
        KVSpec.from_dict(attrs["spec"])
        mans = _load_manifests(loc)
        by_key: dict[str, dict] = {}
        dup: dict[str, list[str]] = {}
        for m in mans:
            if m["key"] in by_key:
                dup.setdefault(m["key"], [by_key[m["key"]]["writer_id"]]).append(m["writer_id"])
                continue
            by_key[m["key"]] = m
        ordered = [by_key[k] for k in sorted(by_key)]
        return cls(loc, attrs, ordered, dup)

    @property
    def url(self) -> str:
        return self._loc.url

    def __len__(self) -> int:
        return len(self._manifests)

    def keys(self) -> list[str]:
        return [m["key"] for m in self._manifests]

    def __contains__(self, key: str) -> bool:
        return key in self._pos

    def manifest(self, i_or_key: int | str) -> dict:
        """The per-sample manifest (scalars, checksums, sizes) without touching the arrays."""
        if isinstance(i_or_key, str):
            if i_or_key not in self._pos:
                raise KeyError(f"no sample {i_or_key!r} in {self.url}")
            return self._manifests[self._pos[i_or_key]]
        i = int(i_or_key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        return self._manifests[i]

    def select(self, indices_or_keys: Iterable[int | str] | Any) -> Store:
        """A view on a subset, in the given order: indices, keys, or a datasets.Dataset from table()."""
        if hasattr(indices_or_keys, "column_names") and "key" in indices_or_keys.column_names:
            indices_or_keys = indices_or_keys["key"]
        mans = [self.manifest(x if isinstance(x, str) else int(x)) for x in indices_or_keys]
        return Store(self._loc, self._attrs, mans, {})

    def table(self) -> Any:
        """Per-sample scalars as a datasets.Dataset (no KV): filter by split / camera config / curvature.

        Columns: index, key, clip_id, t0_us, split, camera_config, prefix_len, rope_delta, v0, reasoning,
        camera_names, n_cam, bytes_logical, bytes_stored, writer_id, and curvature_<stat> per stat."""
        import datasets

        stats = sorted({k for m in self._manifests for k in m["curvature"]})
        cols: dict[str, list] = {c: [] for c in (
            "index", "key", "clip_id", "t0_us", "split", "camera_config", "prefix_len", "rope_delta", "v0",
            "reasoning", "camera_names", "n_cam", "bytes_logical", "bytes_stored", "writer_id")}
        cols.update({f"curvature_{s}": [] for s in stats})
        for i, m in enumerate(self._manifests):
            cols["index"].append(i)
            for c in ("key", "clip_id", "t0_us", "split", "camera_config", "prefix_len", "rope_delta",
                      "reasoning", "camera_names", "bytes_logical", "bytes_stored", "writer_id"):
                cols[c].append(m[c])
            cols["v0"].append(float("nan") if m["v0"] is None else m["v0"])
            cols["n_cam"].append(len(m["camera_names"]))
            for s in stats:
                cols[f"curvature_{s}"].append(float(m["curvature"].get(s, float("nan"))))
        features = datasets.Features({
            **{c: datasets.Value("string") for c in ("key", "clip_id", "split", "camera_config", "reasoning", "writer_id")},
            **{c: datasets.Value("int64") for c in ("index", "t0_us", "prefix_len", "rope_delta", "n_cam",
                                                    "bytes_logical", "bytes_stored")},
            "v0": datasets.Value("float64"),
            "camera_names": datasets.Sequence(datasets.Value("string")),
            **{f"curvature_{s}": datasets.Value("float64") for s in stats},
        })
        return datasets.Dataset.from_dict(cols, features=features)

    # ---------------------------------------------------------------- reading
    def _open(self, sid: str, name: str) -> zarr.Array:
        return zarr.open_array(self._loc.sample_store(sid, read_only=True), path=name, mode="r")

    def read_stored(self, i_or_key: int | str, name: str, layers: Sequence[int] | None = None) -> np.ndarray:
        """One stored array of a sample, as stored (codes / bf16 bits); `layers` slices axis 0 of kv/q_*."""
        m = self.manifest(i_or_key)
        z = self._open(m["sid"], name)
        if layers is None:
            return z[...]
        runs = _runs(layers)
        parts = [z[a:b] for a, b in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def read(
        self,
        i_or_key: int | str,
        *,
        layers: int | slice | Sequence[int] | None = None,
        device: str | torch.device | None = None,
        with_hidden: bool = True,
    ) -> CachedSample:
        """Whole sample (or a layer subset of its KV). k, v: (n_layers, kv_heads, L, head_dim) in kv dtype,
        dequantised on `device` (codes are moved first, so dequantisation runs on the GPU)."""
        spec = self.spec
        m = self.manifest(i_or_key)
        sel = _layer_list(layers, spec.num_layers)
        sel_arg = None if sel is None else sel
        dev = torch.device(device) if device is not None else torch.device("cpu")
        raw = self.read_stored(m["key"], "kv", sel_arg)  # (l, 2, H, L, Dc)
        if spec.quant == "none":
            kv = _from_stored(raw, spec.kv_dtype).to(dev)
            k, v = kv[:, 0], kv[:, 1]
        else:
            params = {n: torch.from_numpy(self.read_stored(m["key"], f"q_{n}", sel_arg))
                      for n in kv_quant.param_shapes(spec.quant, 1, 1, 1, spec.head_dim)}
            q = kv_quant.QuantizedKV(torch.from_numpy(raw).to(dev), params)
            k, v = kv_quant.dequantize_kv(q, spec.quant, spec.torch_dtype)
        hidden = None
        if spec.store_hidden and with_hidden:
            hidden = _from_stored(self.read_stored(m["key"], "hidden"), spec.kv_dtype).to(dev)
        small = self.read_small(m["key"])
        return CachedSample(
            key=m["key"], k=k, v=v, prefix_len=m["prefix_len"], rope_delta=m["rope_delta"],
            token_ids=small.pop("token_ids"), hidden=hidden, v0=m["v0"], clip_id=m["clip_id"],
            t0_us=m["t0_us"], camera_config=m["camera_config"], split=m["split"],
            curvature=dict(m["curvature"]), reasoning=m["reasoning"], camera_names=tuple(m["camera_names"]),
            layers=None if sel is None else tuple(sel), **small,
        )

    def read_hidden(self, i_or_key: int | str, device: str | torch.device | None = None) -> torch.Tensor | None:
        """Last-layer hidden states (L, hidden_size) in kv dtype, or None when the store has none."""
        if not self.spec.store_hidden:
            return None
        h = _from_stored(self.read_stored(i_or_key, "hidden"), self.spec.kv_dtype)
        return h if device is None else h.to(device)

    def read_small(self, i_or_key: int | str) -> dict[str, Any]:
        """token_ids, thumbs and the trajectories of a sample, without its KV."""
        m = self.manifest(i_or_key)
        traj = self.read_stored(m["key"], "traj")
        out: dict[str, Any] = {}
        off = 0
        for n, shape in TRAJ_LAYOUT:
            size = math.prod(shape)
            out[n] = traj[off:off + size].reshape(shape).copy()
            off += size
        out["gt_action"] = out["gt_action"].astype(np.float32)
        out["thumbs"] = self.read_stored(m["key"], "thumbs")
        out["token_ids"] = torch.from_numpy(self.read_stored(m["key"], "token_ids").astype(np.int64))
        return out

    # ---------------------------------------------------------------- checks
    def verify(self, *, data: bool = True) -> VerifyReport:
        """Schema, provenance, duplicates, orphans; with data=True also every array's presence, shape,
        crc32 checksum and NaN/Inf (reads the whole store)."""
        rep = VerifyReport(self.url, samples=len(self), checked_data=data)
        missing = [k for k in REQUIRED_PROVENANCE_KEYS if k not in self.provenance]
        if missing:
            rep.errors.append(f"provenance lacks {missing}")
        if self.provenance.get("kv_dtype") != self.spec.kv_dtype or self.provenance.get("quant") != self.spec.quant:
            rep.errors.append("provenance kv_dtype/quant disagree with the spec")
        for key, ws in sorted(self._duplicates.items()):
            rep.errors.append(f"{key}: committed by several writers {ws}")
        committed = {m["sid"] for m in self._manifests}
        sdir = self._loc.path("samples")
        if self._loc.fresh().exists(sdir):
            on_disk = {p.rstrip("/").rsplit("/", 1)[-1] for p in self._loc.fs.ls(sdir, detail=False)}
            on_disk.discard("zarr.json")
            orphans = sorted(on_disk - committed)
            if orphans:
                rep.warnings.append(f"{len(orphans)} uncommitted sample dirs (killed writes; rewritten on resume): "
                                    f"{orphans[:5]}")
        expected = self._expected_arrays()
        for m in self._manifests:
            key = m["key"]
            if m.get("schema_version") != self.schema_version:
                rep.errors.append(f"{key}: manifest schema_version {m.get('schema_version')} != {self.schema_version}")
            if m.get("nonfinite", 0):
                rep.errors.append(f"{key}: {m['nonfinite']} NaN/Inf values in the KV/hidden given to the writer")
            if set(m["arrays"]) != set(expected):
                rep.errors.append(f"{key}: arrays {sorted(m['arrays'])} != expected {sorted(expected)}")
                continue
            L = m["prefix_len"]
            kv_shape = list(kv_quant.code_shape(self.spec.quant, self.spec.num_layers, self.spec.num_kv_heads, L,
                                                self.spec.head_dim))
            if m["arrays"]["kv"]["shape"] != kv_shape:
                rep.errors.append(f"{key}: kv shape {m['arrays']['kv']['shape']} != {kv_shape} (prefix_len {L})")
            if not data:
                continue
            for name, am in m["arrays"].items():
                try:
                    a = self.read_stored(key, name)
                except Exception as e:  # noqa: BLE001 - report any unreadable array
                    rep.errors.append(f"{key}/{name}: unreadable ({type(e).__name__}: {e})")
                    continue
                if list(a.shape) != am["shape"] or str(a.dtype) != am["dtype"]:
                    rep.errors.append(f"{key}/{name}: {a.shape} {a.dtype} != manifest {am['shape']} {am['dtype']}")
                elif _crc(a) != am["crc32"]:
                    rep.errors.append(f"{key}/{name}: checksum mismatch")
                kd = self.spec.kv_dtype if name in ("kv", "hidden") else None
                nf = _nonfinite(a, kd)
                if nf:
                    rep.errors.append(f"{key}/{name}: {nf} NaN/Inf values stored")
        return rep

    def _expected_arrays(self) -> list[str]:
        names = ["kv", "token_ids", "thumbs", "traj"]
        names += [f"q_{n}" for n in kv_quant.param_shapes(self.spec.quant, 1, 1, 1, self.spec.head_dim)]
        if self.spec.store_hidden:
            names.append("hidden")
        return names

    def summary(self) -> dict:
        """Counts and sizes for cache-inspect summary (from manifests only: cheap)."""
        def count(field_: str) -> dict[str, int]:
            out: dict[str, int] = {}
            for m in self._manifests:
                out[m[field_]] = out.get(m[field_], 0) + 1
            return dict(sorted(out.items()))

        logical = sum(m["bytes_logical"] for m in self._manifests)
        stored = sum(m["bytes_stored"] for m in self._manifests)
        tokens = [m["prefix_len"] for m in self._manifests]
        return {
            "url": self.url, "schema_version": self.schema_version, "samples": len(self),
            "tokens": int(sum(tokens)), "prefix_len_min": min(tokens, default=0),
            "prefix_len_max": max(tokens, default=0), "bytes_logical": logical, "bytes_stored": stored,
            "ratio": (logical / stored) if stored else float("nan"), "spec": self.spec.to_dict(),
            "provenance": self.provenance, "splits": count("split"), "camera_configs": count("camera_config"),
            "writers": count("writer_id"),
        }


def _layer_list(layers: int | slice | Sequence[int] | None, n: int) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, int):
        sel = [layers]
    elif isinstance(layers, slice):
        sel = list(range(n))[layers]
    else:
        sel = [int(x) for x in layers]
    sel = [x + n if x < 0 else x for x in sel]
    if not sel or any(not 0 <= x < n for x in sel):
        raise IndexError(f"layers {layers!r} out of range for {n} layers")
    return sel


def _runs(sel: Sequence[int]) -> list[tuple[int, int]]:
    """[3,4,5,9] -> [(3,6),(9,10)]: contiguous basic slices (zarr oindex is slow)."""
    runs: list[tuple[int, int]] = []
    for x in sel:
        if runs and runs[-1][1] == x:
            runs[-1] = (runs[-1][0], x + 1)
        else:
            runs.append((x, x + 1))
    return runs


def synthetic_sample(
    seed: int, spec: KVSpec, *, prefix_len: int | None = None, n_cam: int = 2, split: str | None = None,
    outliers: bool = True,
) -> CachedSample:
    """A deterministic fake sample (tests, benches, debug presets): same seed -> same bytes.

    K imitates Qwen3's post-norm keys: per-channel log-normal gains and a few outlier channels per head
    (kv-storage.md §3.1), so quantisation errors measured on it are representative."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    L = int(prefix_len or rng.integers(10, 41))
    shape = (spec.num_layers, spec.num_kv_heads, L, spec.head_dim)
    gain = torch.exp(0.3 * torch.randn(spec.num_layers, spec.num_kv_heads, 1, spec.head_dim, generator=g))
    if outliers:
        n_out = max(1, spec.head_dim // 32)
        idx = torch.randint(0, spec.head_dim, (n_out,), generator=g)
        gain[..., idx] *= 4.0
    k = torch.randn(shape, generator=g) * gain
    tok = torch.exp(0.35 * torch.randn(spec.num_layers, spec.num_kv_heads, L, 1, generator=g))
    v = torch.randn(shape, generator=g) * tok
    hidden = torch.randn(L, spec.hidden_size, generator=g) if spec.store_hidden else None
    clip = f"clip-{seed:05d}"
    t0 = 5_100_000 + 100_000 * (seed % 7)
    kappa = rng.normal(0, 0.02, size=NUM_FUTURE)
    fut = np.zeros((NUM_FUTURE, 3))
    fut[:, 0] = np.arange(1, NUM_FUTURE + 1) * 1.0
    fut[:, 1] = np.cumsum(np.cumsum(kappa)) * 0.5
    yaw = np.cumsum(kappa)
    rot = np.zeros((NUM_FUTURE, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = (
        np.cos(yaw), -np.sin(yaw), np.sin(yaw), np.cos(yaw), 1.0)
    camera_config = ("full", "front-only")[seed % 2]
    return CachedSample(
        key=f"{clip}@{t0}:{camera_config}", k=k.to(spec.torch_dtype), v=v.to(spec.torch_dtype), prefix_len=L,
        rope_delta=-int(rng.integers(0, 3000)),
        token_ids=torch.randint(0, 155_697, (L,), generator=g),
        hidden=None if hidden is None else hidden.to(spec.torch_dtype),
        thumbs=rng.integers(0, 256, (n_cam, *spec.thumb_hw, 3), dtype=np.uint8),
        ego_history_xyz=rng.normal(size=(NUM_HISTORY, 3)), ego_history_rot=rng.normal(size=(NUM_HISTORY, 3, 3)),
        ego_future_xyz=fut, ego_future_rot=rot, gt_action=rng.normal(size=(NUM_FUTURE, 2)).astype(np.float32),
        v0=float(rng.uniform(0, 20)) if seed % 5 else None, clip_id=clip, t0_us=t0,
        camera_config=camera_config, split=split or ("val" if seed % 4 == 0 else "train"),
        curvature={"max_abs": float(np.abs(kappa).max()), "mean": float(kappa.mean())},
        reasoning="" if seed % 3 == 0 else f"Slow down for the cyclist ({seed}).",
        camera_names=tuple(f"camera_{j}" for j in range(n_cam)),
    )


def default_store_url(name_or_url: str) -> str:
    """A bare name means cache/<name>; anything with a '/' or '://' is taken as given."""
    s = str(name_or_url)
    return s if ("/" in s or "://" in s or s.startswith(".")) else f"{DEFAULT_CACHE_ROOT}/{s}"
