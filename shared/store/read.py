"""The read side: `Store` (open, list, table / select, read whole samples or layer subsets)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import zarr

from shared import kv_quant
from shared.store.format import (
    TRAJ_LAYOUT,
    KVSpec,
    SampleReadError,
    StoreMismatchError,
    _crc,
    expected_files,
    from_stored,
)
from shared.store.location import _load_manifests, _Loc, _read_root
from shared.store.nav import nav_from_manifest, read_unguided
from shared.store.retry import StoreUnavailableError
from shared.store.sample import CachedSample
from shared.store.verify import VerifyReport, verify_store


class Store:
    """Read side. Samples are ordered by key (so index i is the same whatever the writers' timing).

    One Store per DataLoader worker process; do not share one across threads that read concurrently."""

    def __init__(self, loc: _Loc, attrs: dict, manifests: list[dict], duplicates: dict[str, list[str]],
                 checksums: bool = True):
        self._loc = loc
        self.checksums = checksums  # crc32 of every whole array read (docs/CACHE_FORMAT.md: its cost)
        self.schema_version: int = attrs["schema_version"]
        self.provenance: dict = attrs["provenance"]
        self.spec: KVSpec = KVSpec.from_dict(attrs["spec"])
        self._attrs = attrs
        self._manifests = manifests
        self._pos = {m["key"]: i for i, m in enumerate(manifests)}
        self._duplicates = duplicates
        self.damaged_manifests: dict[str, str] = {}  # "<writer_id>/<sid>" -> why (open(skip_damaged=True))

    @classmethod
    def open(cls, url: str, *, storage_options: dict | None = None, checksums: bool = True,
             skip_damaged: bool = False) -> Store:
        """Open a store; refuses a missing store, another format, an unknown schema version, or damaged
        manifests (skip_damaged=True leaves those samples out and lists them in `damaged_manifests`).

        checksums=False skips the crc32 of each array read (missing / resized files are still refused)."""
        loc = _Loc(url, storage_options)
        attrs = _read_root(loc)
        KVSpec.from_dict(attrs["spec"])
        bad: dict[str, str] = {}
        mans = _load_manifests(loc, bad=bad if skip_damaged else None)
        by_key: dict[str, dict] = {}
        dup: dict[str, list[str]] = {}
        for m in mans:
            if m["key"] in by_key:
                dup.setdefault(m["key"], [by_key[m["key"]]["writer_id"]]).append(m["writer_id"])
                continue
            by_key[m["key"]] = m
        ordered = [by_key[k] for k in sorted(by_key)]
        st = cls(loc, attrs, ordered, dup, checksums)
        st.damaged_manifests = bad
        return st

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
                near = [k for k in self._pos if k.startswith(i_or_key)][:3] or self.keys()[:2]
                raise KeyError(f"no sample {i_or_key!r} in {self.url}: keys are clip_id@t0_us:camera_config, "
                               f"e.g. {near}")
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
        return Store(self._loc, self._attrs, mans, {}, self.checksums)

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
    def read_stored(self, i_or_key: int | str, name: str, layers: Sequence[int] | None = None) -> np.ndarray:
        """One stored array of a sample, as stored (codes / bf16 bits); `layers` slices axis 0 of kv/q_*.

        Checked against the manifest: a missing file, a file of another size than recorded, an undecodable
        chunk, another shape, or (unless the store was opened with checksums=False) another crc32 raise
        SampleReadError naming the sample. The crc32 covers the whole array, so a checked layer subset reads
        the whole array and slices it; with checksums=False a subset reads only its layers' chunks.
        A remote store's reads are retried while its endpoint is away; past the retry budget they raise
        StoreUnavailableError (not a SampleReadError: the sample is not damaged)."""
        m = self.manifest(i_or_key)
        key = m["key"]
        am = m["arrays"].get(name)
        if am is None:
            raise SampleReadError(self.url, key, name, f"no such array (the sample has {sorted(m['arrays'])})")
        zs = _CheckedStore(self._loc.sample_store(m["sid"], read_only=True), expected_files(self.spec, m))
        whole = layers is None or self.checksums
        try:
            z = zarr.open_array(zs, path=name, mode="r")
            if whole:
                a = z[...]
            else:
                parts = [z[a:b] for a, b in _runs(layers)]
                a = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        except _FileProblem as e:
            raise SampleReadError(self.url, key, name, e.reason, e.file) from None
        except StoreUnavailableError as e:  # the endpoint was away past the retry budget: not damage
            raise StoreUnavailableError(f"reading sample {key!r} ({name}) of {self.url}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any decode failure of stored bytes is damage to this sample
            raise SampleReadError(self.url, key, name, f"unreadable ({type(e).__name__}: {_first_line(e)})") from e
        want = list(am["shape"]) if whole else [len(layers), *am["shape"][1:]]
        if list(a.shape) != want or str(a.dtype) != am["dtype"]:
            raise SampleReadError(self.url, key, name, f"stored {list(a.shape)} {a.dtype}, manifest {want} {am['dtype']}")
        if self.checksums and _crc(a) != am["crc32"]:
            gone = f"; missing files read as fill values: {zs.missing}" if zs.missing else ""
            raise SampleReadError(self.url, key, name, f"checksum mismatch (crc32 {_crc(a)}, manifest {am['crc32']})"
                                  f"{gone}")
        return a if layers is None or not whole else np.ascontiguousarray(a[list(layers)])

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
            kv = from_stored(raw, spec.kv_dtype).to(dev)
            k, v = kv[:, 0], kv[:, 1]
        else:
            params = {n: torch.from_numpy(self.read_stored(m["key"], f"q_{n}", sel_arg))
                      for n in kv_quant.param_shapes(spec.quant, 1, 1, 1, spec.head_dim)}
            q = kv_quant.QuantizedKV(torch.from_numpy(raw).to(dev), params)
            k, v = kv_quant.dequantize_kv(q, spec.quant, spec.torch_dtype)
        hidden = None
        if spec.store_hidden and with_hidden:
            hidden = from_stored(self.read_stored(m["key"], "hidden"), spec.kv_dtype).to(dev)
        small = self.read_small(m["key"])
        return CachedSample(
            key=m["key"], k=k, v=v, prefix_len=m["prefix_len"], rope_delta=m["rope_delta"],
            token_ids=small.pop("token_ids"), hidden=hidden, v0=m["v0"], clip_id=m["clip_id"],
            t0_us=m["t0_us"], camera_config=m["camera_config"], split=m["split"],
            curvature=dict(m["curvature"]), reasoning=m["reasoning"], camera_names=tuple(m["camera_names"]),
            layers=None if sel is None else tuple(sel), **small, **nav_from_manifest(m),
        )

    def read_unguided(self, i_or_key: int | str, device: str | torch.device | None = None):
        """(k, v) of the unguided suffix, (layers, kv_heads, n, head_dim) each; see shared/store/nav.py."""
        return read_unguided(self, i_or_key, device)

    def read_hidden(self, i_or_key: int | str, device: str | torch.device | None = None) -> torch.Tensor | None:
        """Last-layer hidden states (L, hidden_size) in kv dtype, or None when the store has none."""
        if not self.spec.store_hidden:
            return None
        h = from_stored(self.read_stored(i_or_key, "hidden"), self.spec.kv_dtype)
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
    def require(self, expected: dict, what: str = "expected") -> None:
        """Refuse a store built for something else: StoreMismatchError unless every key of `expected`
        (provenance keys, `schema_version`, or `spec.<field>`) has that value here. `what` names the other
        side in the message, e.g. "the head checkpoint"."""
        have = {**self.provenance, "schema_version": self.schema_version,
                **{f"spec.{k}": v for k, v in self.spec.to_dict().items()}}
        want = json.loads(json.dumps(expected, sort_keys=True, default=str))
        diffs = {k: (have.get(k, "<missing>"), v) for k, v in want.items() if have.get(k, "<missing>") != v}
        if diffs:
            raise StoreMismatchError(self.url, diffs, what)

    def verify(self, *, data: bool = True) -> VerifyReport:
        """Schema, provenance, duplicates, orphans; with data=True also every array's presence, shape,
        crc32 checksum and NaN/Inf (reads the whole store). See shared/store/verify.py."""
        return verify_store(self, data=data)

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


class _FileProblem(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(reason)
        self.file, self.reason = file, reason


class _CheckedStore(zarr.storage.WrapperStore):
    """A sample directory's store whose files must be those the manifest lists.

    zarr reads a missing chunk as the fill value (zeros): here a listed file that is missing raises, and
    a whole-file read of another size than recorded raises (a truncated or appended chunk). For manifests
    without recorded sizes (older stores) a missing chunk is noted, and the crc32 check decides."""

    def __init__(self, store: zarr.abc.store.Store, expected: dict[str, int | None]):
        super().__init__(store)
        self.expected = expected
        self.missing: list[str] = []

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buf = await self._store.get(key, prototype, byte_range)
        if key not in self.expected:
            return buf
        size = self.expected[key]
        if buf is None:
            if size is not None:
                raise _FileProblem(key, "file missing (the manifest lists it)")
            self.missing.append(key)
        elif byte_range is None and size is not None and len(buf) != size:
            raise _FileProblem(key, f"file has {len(buf)} bytes, the manifest recorded {size} (truncated or damaged)")
        return buf


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""


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
