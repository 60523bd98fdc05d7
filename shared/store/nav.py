"""Alpamayo 1.5 per-sample fields of a store (schema v2, `KVSpec.navigation`): write, check, read back.

Manifest fields: `camera_ids` (prompt order), `nav_text` (None = no route), `route_span` [r_s, r_e]
(inclusive, in token_ids; None without a route) and `unguided_len` L_u = L - (r_e - r_s + 1), the
prefix length of the unguided branch (= L without a route). With `KVSpec.unguided`, a sample with a
route also holds `kv_unguided` (layers, 2, kv_heads, L - r_e - 1, head_dim): only the tokens after the
route, recomputed without it. The unguided KV over [0, r_s) IS the guided KV there (causal VLM, same
ids and positions), so it is not stored twice; `unguided_kv` reassembles the whole prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from shared.store.format import KVSpec, _to_numpy_stored, from_stored


def nav_fields(s) -> dict:
    """The manifest entries of a CachedSample `s` (a navigation store)."""
    span = None if s.route_span is None else [int(s.route_span[0]), int(s.route_span[1])]
    L = int(s.prefix_len)
    return {"camera_ids": [int(c) for c in s.camera_ids], "nav_text": s.nav_text, "route_span": span,
            "unguided_len": L if span is None else L - (span[1] - span[0] + 1)}


def nav_arrays(s, spec: KVSpec) -> dict[str, np.ndarray]:
    """{"kv_unguided": stored form} when the store keeps the unguided suffix and `s` has a route."""
    if not spec.unguided or s.route_span is None:
        return {}
    kv = torch.stack((s.unguided_k, s.unguided_v), dim=1)  # (layers, 2, kv_heads, n, head_dim)
    return {"kv_unguided": _to_numpy_stored(kv, spec.kv_dtype)}


def validate_nav(s, spec: KVSpec, bad: Callable[[str], None]) -> None:
    """Shape/consistency checks of the 1.5 fields (the caller's `bad` raises, naming the sample)."""
    if not spec.navigation:
        if s.camera_ids is not None or s.nav_text is not None or s.route_span is not None:
            bad("camera_ids / nav_text / route_span given, but the store was created without navigation=True")
        return
    if s.camera_ids is None or len(s.camera_ids) != len(s.camera_names):
        bad(f"camera_ids must list one index per camera ({len(s.camera_names)}), got {s.camera_ids}")
    if list(s.camera_ids) != sorted(set(int(c) for c in s.camera_ids)):
        bad(f"camera_ids must be distinct and ascending (the 1.5 prompt order), got {list(s.camera_ids)}")
    if (s.nav_text is None) != (s.route_span is None):
        bad("nav_text and route_span go together: both None (no route) or both set")
    L = int(s.prefix_len)
    if s.route_span is not None:
        r_s, r_e = (int(x) for x in s.route_span)
        if not 0 < r_s < r_e < L - 1:
            bad(f"route_span {list(s.route_span)} must satisfy 0 < r_s < r_e < prefix_len - 1 = {L - 1}")
        if spec.unguided:
            want = (spec.num_layers, spec.num_kv_heads, L - r_e - 1, spec.head_dim)
            for n in ("unguided_k", "unguided_v"):
                t = getattr(s, n)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != spec.torch_dtype:
                    bad(f"{n} must be {want} {spec.kv_dtype} (the tokens after the route), got "
                        f"{getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}")


def nav_from_manifest(m: dict) -> dict:
    """CachedSample keyword arguments from a manifest (all None for v1 / R1 samples)."""
    span = m.get("route_span")
    ids = m.get("camera_ids")
    return {"camera_ids": None if ids is None else tuple(ids), "nav_text": m.get("nav_text"),
            "route_span": None if span is None else (int(span[0]), int(span[1]))}


def read_unguided(store, i_or_key, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored unguided suffix (k, v), each (layers, kv_heads, n, head_dim) in kv dtype."""
    raw = from_stored(store.read_stored(i_or_key, "kv_unguided"), store.spec.kv_dtype)
    raw = raw if device is None else raw.to(device)
    return raw[:, 0], raw[:, 1]


def unguided_kv(k: torch.Tensor, v: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor,
                r_s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole unguided prefix (layers, kv_heads, r_s + n, head_dim): guided [0, r_s) + the suffix."""
    return (torch.cat([k[..., :r_s, :], suffix_k.to(k.dtype)], dim=-2),
            torch.cat([v[..., :r_s, :], suffix_v.to(v.dtype)], dim=-2))


def unguided_sample(store, s):
    """The unguided (no-route) variant of a read CachedSample `s`: k/v = guided [0, r_s) + the stored
    suffix, prefix_len = L_u. A sample without a route is its own unguided variant."""
    import dataclasses

    if s.route_span is None:
        return s
    if not store.spec.unguided:
        raise ValueError(f"{store.url}: sample {s.key!r} has a route but the store holds no unguided suffix; "
                         "rebuild it with `cache-build --unguided`")
    uk, uv = read_unguided(store, s.key, s.k.device)
    k, v = unguided_kv(s.k, s.v, uk, uv, s.route_span[0])
    return dataclasses.replace(s, k=k, v=v, prefix_len=int(k.shape[2]), nav_text=None, route_span=None,
                               unguided_k=None, unguided_v=None, hidden=None)
