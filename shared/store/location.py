"""Where a store lives (an fsspec filesystem + root) and what is committed there (manifest listing)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable

import fsspec
import zarr

from shared.store.format import (
    FORMAT_NAME,
    SUPPORTED_SCHEMA_VERSIONS,
    StoreError,
    root_digest,
    sample_id,
    unescape_sid,
)
from shared.store.retry import RetryingFS, RetryingStore, RetryPolicy, inner_s3_defaults, no_hidden_retries


class _Loc:
    """An fsspec filesystem + root path, and how to make per-sample zarr stores under it.

    Remote stores retry their IO while the endpoint is away (shared/store/retry.py); `storage_options`
    keeps its "retry" entry so that writer processes rebuilt from it retry alike."""

    def __init__(self, url: str, storage_options: dict | None):
        self.storage_options = dict(storage_options or {})
        self.retry = RetryPolicy.resolve(self.storage_options.get("retry"))
        self._fs_options = {k: v for k, v in self.storage_options.items() if k != "retry"}
        if str(url).startswith(("s3://", "s3a://")):
            self._fs_options = inner_s3_defaults(self._fs_options)
        fs, path = fsspec.core.url_to_fs(str(url), **self._fs_options)
        self.local = "file" in _protocols(fs)
        no_hidden_retries(fs)
        self.fs = fs if self.local else RetryingFS(fs, self.retry)
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")
        self.url = self.root if self.local else fs.unstrip_protocol(self.root)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def sample_store(self, sid: str, read_only: bool = False) -> zarr.abc.store.Store:
        if self.local:
            return zarr.storage.LocalStore(self.path("samples", sid), read_only=read_only)
        url = self.url + "/samples/" + sid
        inner = zarr.storage.FsspecStore.from_url(url, storage_options=self._fs_options or None, read_only=read_only)
        no_hidden_retries(inner.fs)
        return RetryingStore(inner, self.retry, url)

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
    want = attrs.get("root_sha256")  # stores written before 2026-12-07 have none
    have = root_digest(attrs.get("provenance"), attrs.get("spec")) if want is not None else None
    if have != want:
        raise StoreError(f"{p}: its provenance / spec differ from what the build recorded (sha256 {have[:12]} vs "
                         f"{want[:12]}): the file was edited after the build; restore it or rebuild the cache")
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


def _load_manifests(loc: _Loc, writers: Iterable[str] | None = None, use_index: bool = True,
                    bad: dict[str, str] | None = None) -> list[dict]:
    """All committed manifests (one per commit file), using index snapshots where they are current.

    A manifest that is not JSON or lacks what a reader needs raises StoreError naming it; with `bad`
    given it is left out and recorded there instead ("<writer_id>/<sid>" -> what is wrong)."""
    names = _list_commit_names(loc, writers)
    have: dict[tuple[str, str], dict] = {}
    if use_index:
        for wid in sorted({w for w, _ in names}):
            p = loc.path("index", f"{wid}.json")
            try:
                snap = loc.read_json(p)
            except (FileNotFoundError, ValueError):
                continue
            for m in snap.get("manifests", []) if isinstance(snap, dict) else []:
                if isinstance(m, dict) and _manifest_problem(m, m.get("writer_id"), m.get("sid")) is None:
                    have[(m["writer_id"], m["sid"])] = m  # anything odd in a snapshot: read the commit file
    todo = [x for x in names if x not in have]
    problems: dict[str, str] = {}
    if todo:
        paths = [loc.path("commits", w, f"{s}.json") for w, s in todo]
        blobs = loc.fs.cat(paths) if len(paths) > 1 else {paths[0]: loc.fs.cat_file(paths[0])}
        by_path = {_strip(loc, p): b for p, b in blobs.items()}
        for (w, s), p in zip(todo, paths):
            try:
                m = json.loads(by_path[_strip(loc, p)])
            except ValueError as e:
                problems[f"{w}/{s}"] = f"not JSON ({e})"
                continue
            why = _manifest_problem(m, w, s)
            if why is None:
                have[(w, s)] = m
            else:
                problems[f"{w}/{s}"] = why
    if problems and bad is None:
        first = sorted(problems)[0]
        raise StoreError(f"{len(problems)} damaged manifest(s) in {loc.url}/commits, e.g. {first}.json "
                         f"(sample {unescape_sid(first.split('/', 1)[1])!r}): {problems[first]}; "
                         f"`cache-inspect verify {loc.url}` lists them")
    if bad is not None:
        bad.update(problems)
    return [have[x] for x in names if x in have]


_MANIFEST_FIELDS = {"key": str, "sid": str, "writer_id": str, "prefix_len": int, "arrays": dict, "schema_version": int,
                    "clip_id": str, "t0_us": int, "camera_config": str, "split": str, "camera_names": list,
                    "curvature": dict, "reasoning": str, "bytes_logical": int, "bytes_stored": int}


def _manifest_problem(m: object, writer_id: object, sid: object) -> str | None:
    """What makes a manifest unusable (a reader would crash or misread it), or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    for k, typ in _MANIFEST_FIELDS.items():
        if not isinstance(m.get(k), typ) or isinstance(m.get(k), bool):
            return f"field {k!r} missing or not {typ.__name__} ({m.get(k, '<missing>')!r:.60})"
    if m["sid"] != sid or m["writer_id"] != writer_id:
        return f"sid/writer_id {m['sid']!r}/{m['writer_id']!r} do not match its file name {writer_id}/{sid}"
    if sample_id(m["key"]) != sid:
        return f"key {m['key']!r} does not match its file name {sid}"
    for name, am in m["arrays"].items():
        if not (isinstance(am, dict) and isinstance(am.get("shape"), list) and isinstance(am.get("dtype"), str)
                and isinstance(am.get("crc32"), int)):
            return f"arrays[{name!r}] lacks shape/dtype/crc32"
    if "files" in m and not (isinstance(m["files"], dict) and all(isinstance(v, int) for v in m["files"].values())):
        return "files is not {name: size}"
    return None


def _strip(loc: _Loc, p: str) -> str:
    return p.rsplit("/commits/", 1)[-1]
