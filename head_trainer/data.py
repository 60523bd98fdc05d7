"""Cache store -> batches for the head: the only way phase 2 sees data.

    for micro in make_loader(url, indices, batch_size=8, seed=42, start=0, stop=1000, num_workers=8,
                             device="cuda", ram_budget_bytes=32e9):   # -> list of grad_accum Batches
        stats = step(micro, lr, step)

Order: the global batch of step s is positions [s * G, (s + 1) * G) of an endless sequence of
epoch permutations seeded by (seed, epoch), G = batch x world x grad_accum; rank r's micro-batch m is
the slice [(m * world + r) * B, +B). So the batches are a pure function of (seed, step): a resumed
run, and a 2-rank run at the same global batch, read exactly what an uninterrupted 1-rank run reads.

Work split: DataLoader workers read whole samples in their stored form (zstd decoded there) and pad
them to a length bucket; the main process hands them to `DeviceFeeder` (head_trainer/feeder.py),
which copies them to the GPU on a side stream and dequantises int8/int4 there, and keeps hot samples
in a pinned host-RAM tier and a GPU tier within budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.head import KVPrefix
from shared.store import CachedSample, Store, from_stored

BUCKET = 64  # prefix lengths are padded up to a multiple of this, so step shapes repeat


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


def collate(items: list[dict]) -> Batch:
    return Batch(
        keys=[it["key"] for it in items],
        prefix=KVPrefix.collate([(it["k"], it["v"], it["L"], it["delta"]) for it in items]),
        action=torch.stack([it["action"] for it in items]).float(),
        hist_xyz=torch.stack([it["hist_xyz"] for it in items]).float(),
        hist_rot=torch.stack([it["hist_rot"] for it in items]).float(),
        fut_xyz=torch.stack([it["fut_xyz"] for it in items]).float(),
    )


# -- raw (stored-form) samples: what workers read and the feeder dequantises -----------------------
def read_raw(store: Store, i: int) -> dict:
    """Sample i as stored: kv codes (layers, 2, H, L, Dc) as a torch tensor of the stored dtype
    (bf16 / fp32 / int8 / uint8), quantisation parameters, and the trajectories."""
    if i >= len(store):  # the unguided variant of sample i - len(store) (head_trainer/route_mix.py)
        from .route_mix import read_unguided_raw

        return read_unguided_raw(store, i - len(store), read_raw)
    m = store.manifest(i)
    kv = store.read_stored(i, "kv")
    kv_t = from_stored(kv, store.spec.kv_dtype if store.spec.quant == "none" else "codes")  # int8/uint8 codes as they are
    q = {}
    if store.spec.quant != "none":
        from shared import kv_quant

        names = kv_quant.param_shapes(store.spec.quant, 1, 1, 1, store.spec.head_dim)
        q = {n: torch.from_numpy(np.ascontiguousarray(store.read_stored(i, f"q_{n}"))) for n in names}
    small = store.read_small(i)
    return {"key": m["key"], "index": i, "kv": kv_t, "q": q, "L": int(m["prefix_len"]), "delta": int(m["rope_delta"]),
            "action": torch.from_numpy(small["gt_action"]),
            "hist_xyz": torch.from_numpy(small["ego_history_xyz"]), "hist_rot": torch.from_numpy(small["ego_history_rot"]),
            "fut_xyz": torch.from_numpy(small["ego_future_xyz"])}


def raw_nbytes(raw: dict) -> int:
    return raw["kv"].numel() * raw["kv"].element_size() + sum(t.numel() * t.element_size() for t in raw["q"].values())


class RawDataset(Dataset):
    """Stored-form samples of a store; `skip` = store indices the feeder already holds (tiers)."""

    def __init__(self, url: str, skip: frozenset[int] = frozenset()):
        self.url, self.skip = url, skip
        self._store: Store | None = None

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, batch: list[int]) -> list[dict | int]:
        if self._store is None:
            self._store = Store.open(self.url)
        return [i if i in self.skip else read_raw(self._store, i) for i in batch]


def _identity(x):
    return x


class StepBatchSampler(Sampler[list[int]]):
    """Store indices of this rank's micro-batches for steps [start, stop), grad_accum per step."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        if not indices:
            raise ValueError("no training samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.indices, self.bs, self.seed, self.start, self.stop = list(indices), batch_size, seed, start, stop
        self.rank, self.world, self.accum = rank, world_size, grad_accum
        self._perm: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.bs * self.world * self.accum

    def position(self, j: int) -> int:
        """Store index at global sequence position j."""
        epoch, pos = divmod(j, len(self.indices))
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))}
        return self.indices[int(self._perm[epoch][pos])]

    def micro_batch(self, step: int, m: int) -> list[int]:
        base = step * self.global_batch + (m * self.world + self.rank) * self.bs
        return [self.position(j) for j in range(base, base + self.bs)]

    def __iter__(self):
        for step in range(self.start, self.stop):
            for m in range(self.accum):
                yield self.micro_batch(step, m)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum


def split_indices(store: Store, split: str | None) -> list[int]:
    """Indices of `split` ('train', 'val', ...; None = all)."""
    if split is None:
        return list(range(len(store)))
    return [i for i in range(len(store)) if store.manifest(i)["split"] == split]


def bucket_len(n: int, bucket: int = BUCKET) -> int:
    return int(math.ceil(n / bucket) * bucket)


def make_loader(url: str, indices: list[int], batch_size: int, seed: int, start: int, stop: int,
                num_workers: int = 0, pin_memory: bool = False, ram_budget_bytes: int = 0, rank: int = 0,
                world_size: int = 1, grad_accum: int = 1, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, gpu_budget_bytes: int = 0, bucket: int = BUCKET,
                progress: bool = False):
    """-> a `FeederLoader`: iterate for one list of `grad_accum` Batches (on `device`) per step."""
    from .feeder import DeviceFeeder, FeederLoader

    store = Store.open(url)
    sampler = StepBatchSampler(indices, batch_size, seed, start, stop, rank, world_size, grad_accum)
    feeder = DeviceFeeder(store, torch.device(device), dtype, bucket)
    feeder.fill_tiers(sorted(set(indices)), ram_budget_bytes, gpu_budget_bytes, num_workers, progress)
    dl = DataLoader(RawDataset(url, frozenset(feeder.held())), batch_size=None, sampler=sampler,
                    collate_fn=_identity, num_workers=num_workers,
                    pin_memory=pin_memory and torch.device(device).type == "cuda",
                    prefetch_factor=4 if num_workers else None, persistent_workers=False)
    return FeederLoader(dl, feeder, grad_accum)
