"""Checking a store: what is committed, against what is on disk.

quick (`data=False`): root schema and provenance, manifests parse, duplicates, orphans, each manifest's
shapes against its prefix length, and every file the manifest lists exists with its recorded size
(one listing of samples/). It does NOT read file contents: flipped bytes that keep a file's size, and
NaN/Inf stored, are found only by the full check, which reads and checksums every array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared import kv_quant
from shared.store.format import (
    REQUIRED_PROVENANCE_KEYS,
    KVSpec,
    SampleReadError,
    _nonfinite,
    expected_files,
    unescape_sid,
)

if TYPE_CHECKING:
    from shared.store.read import Store

QUICK_DOES_NOT_CHECK = ("file contents (crc32 of every array: flipped bytes that keep a file's size), "
                        "NaN/Inf stored; run verify without --quick for those")


@dataclass
class VerifyReport:
    url: str
    samples: int = 0
    checked_data: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    damaged: set[str] = field(default_factory=set)  # keys of samples with an error

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, key: str | None, msg: str) -> None:
        self.errors.append(msg if key is None else f"{key}: {msg}")
        if key is not None:
            self.damaged.add(key)

    def __str__(self) -> str:
        head = f"verify {self.url}: {self.samples} samples, {'OK' if self.ok else f'{len(self.errors)} ERRORS'}"
        if self.damaged:
            head += f", {len(self.damaged)} damaged samples: {', '.join(sorted(self.damaged))}"
        lines = [head, *(f"  ERROR {e}" for e in self.errors), *(f"  warn  {w}" for w in self.warnings)]
        if not self.checked_data:
            lines.append(f"  note  --quick did not check {QUICK_DOES_NOT_CHECK}")
        return "\n".join(lines)


def verify_store(store: Store, *, data: bool = True) -> VerifyReport:
    """Schema, provenance, duplicates, orphans, listed files and sizes; with data=True also every array's
    shape, crc32 and NaN/Inf (reads the whole store)."""
    rep = VerifyReport(store.url, samples=len(store) + len(store.damaged_manifests), checked_data=data)
    missing = [k for k in REQUIRED_PROVENANCE_KEYS if k not in store.provenance]
    if missing:
        rep.error(None, f"provenance lacks {missing}")
    if store.provenance.get("kv_dtype") != store.spec.kv_dtype or store.provenance.get("quant") != store.spec.quant:
        rep.error(None, "provenance kv_dtype/quant disagree with the spec")
    for name, why in sorted(store.damaged_manifests.items()):
        rep.error(unescape_sid(name.split("/", 1)[1]), f"manifest commits/{name}.json damaged: {why}")
    for key, ws in sorted(store._duplicates.items()):
        rep.error(key, f"committed by several writers {ws}")
    on_disk = _listing(store)
    committed = {m["sid"] for m in store._manifests}
    orphans = sorted({p.split("/", 1)[0] for p in on_disk} - committed - {"zarr.json"})
    if orphans:
        rep.warnings.append(f"{len(orphans)} uncommitted sample dirs (killed writes; rewritten on resume): "
                            f"{orphans[:5]}")
    expected = expected_arrays(store.spec)
    for m in store._manifests:
        key = m["key"]
        if m.get("schema_version") != store.schema_version:
            rep.error(key, f"manifest schema_version {m.get('schema_version')} != {store.schema_version}")
        if m.get("nonfinite", 0):
            rep.error(key, f"{m['nonfinite']} NaN/Inf values in the KV/hidden given to the writer")
        want = set(expected) | ({"kv_unguided"} if store.spec.unguided and m.get("route_span") else set())
        if set(m["arrays"]) != want:
            rep.error(key, f"arrays {sorted(m['arrays'])} != expected {sorted(want)}")
            continue
        L = m["prefix_len"]
        kv_shape = list(kv_quant.code_shape(store.spec.quant, store.spec.num_layers, store.spec.num_kv_heads, L,
                                            store.spec.head_dim))
        if m["arrays"]["kv"]["shape"] != kv_shape:
            rep.error(key, f"kv shape {m['arrays']['kv']['shape']} != {kv_shape} (prefix_len {L})")
            continue
        for f, size in expected_files(store.spec, m).items():
            got = on_disk.get(f"{m['sid']}/{f}")
            if got is None:
                rep.error(key, f"file {f} missing")
            elif size is not None and got != size:
                rep.error(key, f"file {f} has {got} bytes, the manifest recorded {size}")
        if not data or key in rep.damaged:
            continue
        for name in m["arrays"]:
            try:
                a = store.read_stored(key, name)
            except SampleReadError as e:
                rep.error(key, f"{name}: {e.reason}" + (f" ({e.file})" if e.file else ""))
                continue
            kd = store.spec.kv_dtype if name in ("kv", "hidden", "kv_unguided") else None
            nf = _nonfinite(a, kd)
            if nf:
                rep.error(key, f"{name}: {nf} NaN/Inf values stored")
    return rep


def _listing(store: Store) -> dict[str, int]:
    """'<sid>/<file>' -> size of everything under samples/ (one recursive listing)."""
    loc = store._loc
    base = loc.path("samples").rstrip("/")
    fs = loc.fresh()
    if not fs.exists(base):
        return {}
    out = {}
    for p, info in fs.find(base, detail=True).items():
        rel = p[len(base) + 1:] if p.startswith(base) else p.split("/samples/", 1)[-1]
        out[rel] = int(info.get("size") or 0)
    return out


def expected_arrays(spec: KVSpec) -> list[str]:
    """Names of the arrays every sample of a store with this spec holds."""
    names = ["kv", "token_ids", "thumbs", "traj"]
    names += [f"q_{n}" for n in kv_quant.param_shapes(spec.quant, 1, 1, 1, spec.head_dim)]
    if spec.store_hidden:
        names.append("hidden")
    return names
