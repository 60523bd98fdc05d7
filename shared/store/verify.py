"""Checking a store: schema, provenance, duplicates, orphans and, with data, every array's checksum."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared import kv_quant

if TYPE_CHECKING:
    from shared.store.read import Store

from shared.store.format import REQUIRED_PROVENANCE_KEYS, KVSpec, _crc, _nonfinite


@dataclass
class VerifyReport:
    url: str
    samples: int = 0
    checked_data: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(store) -> bool:
        return not store.errors

    def __str__(store) -> str:
        head = f"verify {store.url}: {store.samples} samples, {'OK' if store.ok else f'{len(store.errors)} ERRORS'}"
        lines = [head, *(f"  ERROR {e}" for e in store.errors), *(f"  warn  {w}" for w in store.warnings)]
        return "\n".join(lines)


def verify_store(store: Store, *, data: bool = True) -> VerifyReport:
    """Schema, provenance, duplicates, orphans; with data=True also every array's presence, shape,
    crc32 checksum and NaN/Inf (reads the whole store)."""
    rep = VerifyReport(store.url, samples=len(store), checked_data=data)
    missing = [k for k in REQUIRED_PROVENANCE_KEYS if k not in store.provenance]
    if missing:
        rep.errors.append(f"provenance lacks {missing}")
    if store.provenance.get("kv_dtype") != store.spec.kv_dtype or store.provenance.get("quant") != store.spec.quant:
        rep.errors.append("provenance kv_dtype/quant disagree with the spec")
    for key, ws in sorted(store._duplicates.items()):
        rep.errors.append(f"{key}: committed by several writers {ws}")
    committed = {m["sid"] for m in store._manifests}
    sdir = store._loc.path("samples")
    if store._loc.fresh().exists(sdir):
        on_disk = {p.rstrip("/").rsplit("/", 1)[-1] for p in store._loc.fs.ls(sdir, detail=False)}
        on_disk.discard("zarr.json")
        orphans = sorted(on_disk - committed)
        if orphans:
            rep.warnings.append(f"{len(orphans)} uncommitted sample dirs (killed writes; rewritten on resume): "
                                f"{orphans[:5]}")
    expected = expected_arrays(store.spec)
    for m in store._manifests:
        key = m["key"]
        if m.get("schema_version") != store.schema_version:
            rep.errors.append(f"{key}: manifest schema_version {m.get('schema_version')} != {store.schema_version}")
        if m.get("nonfinite", 0):
            rep.errors.append(f"{key}: {m['nonfinite']} NaN/Inf values in the KV/hidden given to the writer")
        if set(m["arrays"]) != set(expected):
            rep.errors.append(f"{key}: arrays {sorted(m['arrays'])} != expected {sorted(expected)}")
            continue
        L = m["prefix_len"]
        kv_shape = list(kv_quant.code_shape(store.spec.quant, store.spec.num_layers, store.spec.num_kv_heads, L,
                                            store.spec.head_dim))
        if m["arrays"]["kv"]["shape"] != kv_shape:
            rep.errors.append(f"{key}: kv shape {m['arrays']['kv']['shape']} != {kv_shape} (prefix_len {L})")
        if not data:
            continue
        for name, am in m["arrays"].items():
            try:
                a = store.read_stored(key, name)
            except Exception as e:  # noqa: BLE001 - report any unreadable array
                rep.errors.append(f"{key}/{name}: unreadable ({type(e).__name__}: {e})")
                continue
            if list(a.shape) != am["shape"] or str(a.dtype) != am["dtype"]:
                rep.errors.append(f"{key}/{name}: {a.shape} {a.dtype} != manifest {am['shape']} {am['dtype']}")
            elif _crc(a) != am["crc32"]:
                rep.errors.append(f"{key}/{name}: checksum mismatch")
            kd = store.spec.kv_dtype if name in ("kv", "hidden") else None
            nf = _nonfinite(a, kd)
            if nf:
                rep.errors.append(f"{key}/{name}: {nf} NaN/Inf values stored")
    return rep


def expected_arrays(spec: KVSpec) -> list[str]:
    """Names of the arrays every sample of a store with this spec holds."""
    names = ["kv", "token_ids", "thumbs", "traj"]
    names += [f"q_{n}" for n in kv_quant.param_shapes(spec.quant, 1, 1, 1, spec.head_dim)]
    if spec.store_hidden:
        names.append("hidden")
    return names
