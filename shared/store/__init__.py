"""The KV cache store: the on-disk contract between `cache-build` (writes) and `head-train` (reads).

One Zarr v3 store per build, local (`cache/<name>/`) or any fsspec URL (`s3://bucket/x`). Layout and
the measurements behind it are in docs/CACHE_FORMAT.md; in short:

    <root>/zarr.json                      root group; attributes = format, schema_version, provenance, spec, root_sha256
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

Modules, bottom up (each imports only those above it):
    format.py    format name, schema version, KVSpec, provenance, key escaping, stored encodings, chunking
    sample.py    CachedSample (the record written and read), thumbnails, synthetic_sample
    nav.py       Alpamayo 1.5 fields (schema v2): camera ids, nav text, route span, unguided suffix
    size.py      estimate_sample_bytes (cache-build --dry-run)
    retry.py     retries with backoff while a remote store's endpoint is away (RetryPolicy)
    location.py  an fsspec root, atomic puts, root metadata, listing committed manifests
    commit.py    one sample's arrays, then its manifest (the commit point)
    procs.py     writer processes that run commit.py out of the builder's process
    write.py     StoreWriter
    verify.py    VerifyReport, verify_store
    read.py      Store
"""

from shared.store.commit import _SampleCommitter
from shared.store.format import (
    CODECS,
    DEFAULT_CACHE_ROOT,
    FORMAT_NAME,
    KV_DTYPES,
    REQUIRED_PROVENANCE_KEYS,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    TRAJ_LAYOUT,
    TRAJ_SIZE,
    KVSpec,
    SampleReadError,
    StoreError,
    StoreMismatchError,
    default_store_url,
    diff_keys,
    expected_files,
    from_stored,
    normalize_provenance,
    sample_id,
    unescape_sid,
)
from shared.store.location import _Loc
from shared.store.read import Store
from shared.store.retry import RetryPolicy, StoreUnavailableError
from shared.store.sample import CachedSample, make_thumbnails, synthetic_sample
from shared.store.size import SizeEstimate, estimate_sample_bytes
from shared.store.verify import VerifyReport
from shared.store.write import StoreWriter, drop_samples

__all__ = [
    "CODECS", "DEFAULT_CACHE_ROOT", "FORMAT_NAME", "KV_DTYPES", "REQUIRED_PROVENANCE_KEYS", "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS", "TRAJ_LAYOUT", "TRAJ_SIZE", "CachedSample", "KVSpec", "SizeEstimate", "Store",
    "RetryPolicy", "SampleReadError", "StoreError", "StoreUnavailableError", "StoreMismatchError", "StoreWriter", "drop_samples", "expected_files", "from_stored", "VerifyReport", "default_store_url", "diff_keys", "estimate_sample_bytes",
    "make_thumbnails", "normalize_provenance", "sample_id", "synthetic_sample", "unescape_sid",
    "_Loc", "_SampleCommitter",  # used by tests and older callers
]
