"""Writing one sample: its arrays under samples/<sid>/, then its manifest, the commit point.

Shared by the writer's threads (shared/store/write.py) and the writer processes (shared/store/procs.py).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync as zarr_sync

from shared.failpoints import armed, failpoint
from shared.store.format import (
    KVSpec,
    _array_attrs,
    _compressors,
    _crc,
    _hidden_tokens_per_chunk,
    _kv_layers_per_chunk,
    sample_id,
    stored_rows,
)
from shared.store.location import _Loc


class _CountingStore(zarr.storage.WrapperStore):
    """A fresh sample directory's store that records the size of each file written through it.

    Every key of a sample is written once and whole, so the sizes are what a listing of the directory
    finds afterwards (the manifest's `files`, what readers and `verify --quick` check against)."""

    def __init__(self, store: zarr.abc.store.Store):
        super().__init__(store)
        self.sizes: dict[str, int] = {}

    async def set(self, key: str, value: Any) -> None:
        if armed("chunk_write") and "/c." in key:
            root = getattr(self._store, "root", None)
            failpoint("chunk_write", partial=None if root is None else (str(root / key), value.to_bytes()), file=key,
                      sid=getattr(root, "name", "?"))
        await self._store.set(key, value)
        self.sizes[key] = len(value)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


@dataclass(frozen=True)
class _ArrayLayout:
    """zarr's metadata of one array of a sample, and the documents zarr.create_array writes for it."""

    metadata: Any  # zarr ArrayV3Metadata
    docs: dict[str, Any]  # store key -> Buffer: "<name>/zarr.json" and the group's "zarr.json"
    rows: int  # rows (axis 0) of one stored chunk, or of one shard when sharded


class _SampleCommitter:
    """Writes one sample's arrays under samples/<sid>/, then its manifest: the commit point.

    Runs on the writer's threads, or inside a writer process (shared/store/procs.py)."""

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
        manifest = {"schema_version": self.spec.schema_version, "sid": sid, "writer_id": self.writer_id, **fields,
                    "arrays": meta, "files": dict(sorted(zs.sizes.items())), "bytes_stored": stored, "written": _dt.datetime.now(_dt.UTC).isoformat()}
        body = json.dumps(manifest, sort_keys=True).encode()
        manifest["bytes_stored"] = stored + len(body)
        body = json.dumps(manifest, sort_keys=True).encode()
        if before_commit is not None:
            before_commit()
        path = loc.path("commits", self.writer_id, f"{sid}.json")
        failpoint("before_commit", key=fields["key"], sid=sid)
        if armed("manifest_write"):
            failpoint("manifest_write", partial=(f"{path}.tmp-failpoint", body) if loc.local else None, key=fields["key"])
        loc.put_atomic(path, body)  # the commit point
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
        if lay.rows != stored_rows(spec, name, a.shape):  # readers derive file names from stored_rows
            raise RuntimeError(f"{name}: zarr stores {lay.rows} rows per object, stored_rows says "
                               f"{stored_rows(spec, name, a.shape)}")
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
