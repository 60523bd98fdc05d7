"""Keeping the unguided (no-route) mode trained when fine-tuning on Alpamayo 1.5 navigation stores.

Guidance at inference mixes the expert's velocity on the prompt with and without the route, so the
expert must stay good at both. The official 1.5 recipe trains every nav sample with its route and
has no route dropout (its `train_ignore_guidance_rate=0.1` is unused); how the release learned the
unguided mode is not public. Our strategy: a recorded fraction `rate` of the training items are
no-route prefixes. Samples built without a route count; the rest are unguided variants of routed
samples (their stored suffix, `cache-build --unguided`), chosen once by the run's seed and added to
the index list beside their guided originals, so batches stay a pure function of (seed, step).

An unguided variant of store sample i has index i + len(store); `read_raw` resolves it here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shared.store import Store, from_stored


def mix_indices(store: Store, indices: list[int], rate: float, seed: int) -> tuple[list[int], dict]:
    """-> (training indices with unguided variants added, what to record in the run's config)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"--unguided-mix {rate}: must be in [0, 1)")
    if rate == 0.0:
        return list(indices), {}
    if not store.spec.navigation:
        raise ValueError(f"--unguided-mix needs an Alpamayo 1.5 store; {store.url} has no navigation fields")
    routed = [i for i in indices if store.manifest(i).get("route_span") is not None]
    no_route = len(indices) - len(routed)
    want = max(0, math.ceil((rate * len(indices) - no_route) / (1.0 - rate)))
    if want and not store.spec.unguided:
        raise ValueError(f"--unguided-mix {rate}: {store.url} holds no unguided suffix; rebuild with "
                         "`cache-build --unguided` (or lower the rate to the store's no-route share "
                         f"{no_route / len(indices):.3f})")
    n_extra = min(want, len(routed))
    pick = sorted(np.random.default_rng([seed, 15]).choice(len(routed), n_extra, replace=False).tolist())
    extra = [routed[j] + len(store) for j in pick]
    total = len(indices) + n_extra
    return list(indices) + extra, {"rate": rate, "no_route_items": no_route + n_extra, "items": total,
                                   "no_route_fraction": (no_route + n_extra) / total, "unguided_variants": n_extra}


def read_unguided_raw(store: Store, i: int, read_raw) -> dict:
    """Stored-form unguided variant of sample i: kv (layers, 2, H, L_u, D) = kv[..., :r_s, :] + suffix."""
    if store.spec.quant != "none":
        raise ValueError("--unguided-mix supports unquantised stores (the suffix is stored unquantised)")
    raw = read_raw(store, i)
    r_s = int(store.manifest(i)["route_span"][0])
    suffix = store.read_stored(i, "kv_unguided")  # (layers, 2, H, n, D) stored form
    suffix_t = from_stored(suffix, store.spec.kv_dtype)  # unquantised: quantised stores are refused above
    raw["kv"] = torch.cat([raw["kv"][:, :, :, :r_s], suffix_t], dim=3)
    raw.update(index=i + len(store), L=int(raw["kv"].shape[3]), key=raw["key"] + "#unguided")
    return raw
