"""Cache store -> batches for the head: the only way phase 2 sees data.

Batches are right-padded `KVPrefix`es (the expert masks the padding). Batch order is a pure
function of (seed, step), so a resumed run draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.head import KVPrefix
from shared.store import CachedSample, Store


@dataclass
class Batch:
    keys: list[str]
    prefix: KVPrefix  # B prefixes, layers x (B, kv_heads, L_max, head_dim)
    action: torch.Tensor  # (B, 64, 2) normalised GT action
    hist_xyz: torch.Tensor  # (B, 16, 3)
    hist_rot: torch.Tensor  # (B, 16, 3, 3)
    fut_xyz: torch.Tensor  # (B, 64, 3)

    def to(self, device) -> Batch:
        nb = device.type == "cuda" if isinstance(device, torch.device) else str(device).startswith("cuda")
        return Batch(self.keys, self.prefix.to(device), self.action.to(device, non_blocking=nb),
                     self.hist_xyz.to(device), self.hist_rot.to(device), self.fut_xyz.to(device))


def sample_item(s: CachedSample) -> dict:
    """One stored sample -> the tensors `collate` batches."""
    return {
        "key": s.key, "k": s.k, "v": s.v, "L": s.prefix_len, "delta": s.rope_delta,
        "action": torch.from_numpy(s.gt_action),
        "hist_xyz": torch.from_numpy(s.ego_history_xyz), "hist_rot": torch.from_numpy(s.ego_history_rot),
        "fut_xyz": torch.from_numpy(s.ego_future_xyz),
    }


class CacheDataset(Dataset):
    """Samples of a store (a subset by index); opens its own Store per worker process."""

    def __init__(self, url: str, indices: list[int], ram_budget_bytes: int = 0):
        self.url = url
        self.indices = list(indices)
        self._store: Store | None = None
        self._ram: dict[int, dict] = {}  # decoded samples kept while under budget (small stores, many epochs)
        self._ram_budget, self._ram_used = ram_budget_bytes, 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if i in self._ram:
            return self._ram[i]
        if self._store is None:
            self._store = Store.open(self.url)
        s = self._store.read(self.indices[i], with_hidden=False)
        item = sample_item(s)
        size = 2 * s.k.numel() * s.k.element_size()
        if self._ram_used + size <= self._ram_budget:
            self._ram[i] = item
            self._ram_used += size
        return item


def collate(items: list[dict]) -> Batch:
    return Batch(
        keys=[it["key"] for it in items],
        prefix=KVPrefix.collate([(it["k"], it["v"], it["L"], it["delta"]) for it in items]),
        action=torch.stack([it["action"] for it in items]).float(),
        hist_xyz=torch.stack([it["hist_xyz"] for it in items]).float(),
        hist_rot=torch.stack([it["hist_rot"] for it in items]).float(),
        fut_xyz=torch.stack([it["fut_xyz"] for it in items]).float(),
    )


class StepBatchSampler(Sampler[list[int]]):
    """Batches for steps [start, stop): epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        if n == 0:
            raise ValueError("no training samples")
        self.n, self.bs, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def batch_at(self, step: int) -> list[int]:
        out = []
        for j in range(step * self.bs, (step + 1) * self.bs):
            epoch, pos = divmod(j, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(perm[pos]))
        return out

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch_at(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def split_indices(store: Store, split: str | None) -> list[int]:
    """Indices of `split` ('train', 'val', ...; None = all)."""
    if split is None:
        return list(range(len(store)))
    return [i for i in range(len(store)) if store.manifest(i)["split"] == split]


def make_loader(url: str, indices: list[int], batch_size: int, seed: int, start: int, stop: int,
                num_workers: int = 0, pin_memory: bool = False, ram_budget_bytes: int = 0) -> DataLoader:
    return DataLoader(
        CacheDataset(url, indices, ram_budget_bytes),
        batch_sampler=StepBatchSampler(len(indices), batch_size, seed, start, stop),
        collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )
