"""Where a store lives (an fsspec filesystem + root) and what is committed there (manifest listing)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable

import fsspec
import zarr

from shared.store.format import FORMAT_NAME, SUPPORTED_SCHEMA_VERSIONS, StoreError, unescape_sid


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
