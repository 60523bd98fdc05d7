"""The on-disk format of a KV cache store and its version: names, the spec, provenance, encodings.

Everything a reader must agree on with the writer lives here (docs/CACHE_FORMAT.md is its prose):
the format name and schema version, `KVSpec`, the provenance keys, how a key becomes a directory
name, how K/V/hidden are stored (bf16 as uint16 bits), the chunking rule and the codecs. Bump
`SCHEMA_VERSION` for any change an older reader would misread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from zarr.codecs import BloscCodec, ZstdCodec

from shared import kv_quant
from shared.sample import NUM_FUTURE, NUM_HISTORY

FORMAT_NAME = "alpamayo-headtune-kvcache"
SCHEMA_VERSION = 1  # stores whose samples hold no navigation fields (every R1 build): bytes as before
SCHEMA_VERSION_NAV = 2  # KVSpec.navigation: per-sample camera ids, nav text, route span, unguided suffix
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
NAV_SPEC_FIELDS = ("navigation", "unguided")  # KVSpec fields written only when set (v1 specs stay byte-identical)
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


class SampleReadError(StoreError):
    """A committed sample's stored data is missing or damaged: never returned as values.

    `key` names the sample, `array` the array, `file` the file under samples/<sid>/ when one is to blame."""

    def __init__(self, url: str, key: str | None = None, array: str = "?", reason: str = "", file: str | None = None):
        if key is None:  # rebuilt from its message alone (torch DataLoader workers re-raise that way)
            super().__init__(url)
            self.url = self.key = self.file = None
            self.array, self.reason = array, url
            return
        self.url, self.key, self.array, self.reason, self.file = url, key, array, reason, file
        where = array if file is None else f"{array} ({file})"
        super().__init__(f"sample {key!r}: {where}: {reason}. `cache-inspect verify {url}` lists every damaged "
                         f"sample; `cache-inspect verify --drop-bad {url}` then `cache-build --resume` rebuilds them")

    def __reduce__(self):  # pickles whole across processes (DataLoader workers, writer processes)
        if self.key is None:
            return (type(self), (self.reason,))
        return (type(self), (self.url, self.key, self.array, self.reason, self.file))


class StoreMismatchError(StoreError):
    """A store is not the one the caller needs (another checkpoint, processor, prefix mode, spec).

    `differences` maps each differing key to (the store's value, the expected value)."""

    def __init__(self, url: str, differences: dict[str, tuple[Any, Any]], what: str = "expected"):
        self.url, self.differences = url, differences
        detail = "; ".join(f"{k}: store {a!r} vs {what} {b!r}" for k, a, b in
                           ((k, *differences[k]) for k in sorted(differences)))
        super().__init__(f"{url} does not match: {detail}")



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
    navigation: bool = False  # Alpamayo 1.5 samples: camera_ids, nav_text, route_span in each manifest (v2)
    unguided: bool = False  # also `kv_unguided`, the prefix's tokens after the route recomputed without it

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
        if self.unguided and not self.navigation:
            raise ValueError("KVSpec.unguided needs navigation=True (the suffix is defined by the route span)")

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION_NAV if self.navigation else SCHEMA_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.kv_dtype]

    @property
    def itemsize(self) -> int:
        return 2 if self.kv_dtype == "bfloat16" else 4

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["thumb_hw"] = list(self.thumb_hw)
        for f in NAV_SPEC_FIELDS:
            if not d[f]:
                del d[f]
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
    auto = {"schema_version": spec.schema_version, "kv_dtype": spec.kv_dtype, "quant": spec.quant}
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


def sample_id(key: str) -> str:
    """Filesystem/object-store safe, injective name for a key: unsafe chars become ~xx (utf-8 hex)."""
    out = []
    for ch in key:
        out.append(ch if _SAFE_CHARS.fullmatch(ch) else "".join(f"~{b:02x}" for b in ch.encode()))
    sid = "".join(out)
    return "~" + sid if sid.startswith((".", "_")) or not sid else sid


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


def stored_rows(spec: KVSpec, name: str, shape: tuple[int, ...]) -> int:
    """Rows (axis 0) of one stored object (chunk, or shard when spec.shard) of array `name`.

    Every array is split along axis 0 only, so a chunk's file is `<name>/c.<i>.0...0`."""
    if name == "kv":
        return shape[0] if spec.shard else _kv_layers_per_chunk(spec, shape[3])
    if name == "hidden":
        ht = _hidden_tokens_per_chunk(spec, shape[0])
        return -(-shape[0] // ht) * ht if spec.shard else ht
    return shape[0]


def sample_file_names(spec: KVSpec, arrays: dict[str, dict]) -> list[str]:
    """Every file a sample directory holds, from the manifest's `arrays` {name: {shape, ...}}: the group's
    zarr.json, each array's zarr.json and every chunk (all are written, even all-zero ones)."""
    names = ["zarr.json"]
    for name, am in arrays.items():
        shape = tuple(am["shape"])
        rows = stored_rows(spec, name, shape)
        tail = ".0" * (len(shape) - 1)
        names += [f"{name}/zarr.json", *(f"{name}/c.{i}{tail}" for i in range(-(-shape[0] // rows)))]
    return sorted(names)


def expected_files(spec: KVSpec, manifest: dict) -> dict[str, int | None]:
    """File under samples/<sid>/ -> its size in bytes, from the manifest (`files`, recorded since the
    reliability work of issue 13); for older manifests the names are derived and the sizes are None."""
    if "files" in manifest:
        return dict(manifest["files"])
    return dict.fromkeys(sample_file_names(spec, manifest["arrays"]))


def root_digest(provenance: dict, spec: dict) -> str:
    """sha256 of the root's provenance and spec as canonical JSON. Written beside them, so a root edited by
    hand (another checkpoint or processor claimed for the same prefixes) is refused on open, not trusted."""
    return hashlib.sha256(json.dumps({"provenance": provenance, "spec": spec}, sort_keys=True).encode()).hexdigest()


def _root_meta(spec: KVSpec, provenance: dict) -> bytes:
    attrs = {"format": FORMAT_NAME, "schema_version": spec.schema_version, "provenance": provenance, "spec": spec.to_dict(),
             "root_sha256": root_digest(provenance, spec.to_dict())}
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}, sort_keys=True, indent=2).encode()


def _compressors(codec: str) -> Any:
    if codec == "zstd":
        return ZstdCodec(level=1)
    if codec == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    return None


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


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


def from_stored(a: np.ndarray, kv_dtype: str) -> torch.Tensor:
    """A stored array -> torch, bf16 bit patterns viewed as bf16 (no copy); other dtypes as they are."""
    a = np.ascontiguousarray(a)
    if kv_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _array_attrs(name: str, spec: KVSpec) -> dict:
    if name == "kv":
        return {"axes": ["layer", "kv(0=K,1=V)", "kv_head", "token", "channel"], "kv_dtype": spec.kv_dtype,
                "quant": spec.quant, "stored_as": "uint16 bf16 bits" if spec.kv_dtype == "bfloat16" and spec.quant == "none" else None}
    if name == "hidden":
        return {"axes": ["token", "channel"], "kv_dtype": spec.kv_dtype}
    if name == "kv_unguided":  # never quantised: 11 tokens for the SFT layout
        return {"axes": ["layer", "kv(0=K,1=V)", "kv_head", "token after the shared part", "channel"],
                "kv_dtype": spec.kv_dtype}
    if name == "traj":
        return {"layout": [[n, list(s)] for n, s in TRAJ_LAYOUT]}
    return {}


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


def default_store_url(name_or_url: str) -> str:
    """Where a store named on a command line lives: URLs and absolute or ./-relative paths as given; a
    bare name is cache/<name>; a relative path (`demo/store`) is itself when a store is there, else
    cache/<path>."""
    s = str(name_or_url)
    if "://" in s or os.path.isabs(s) or s.startswith("."):
        return s
    if "/" in s and os.path.exists(os.path.join(s, "zarr.json")):
        return s
    return f"{DEFAULT_CACHE_ROOT}/{s}"
