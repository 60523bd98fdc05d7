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

A damaged sample (SampleReadError) stops the run, naming it. With skip_bad=True (--skip-bad-samples)
its place in the batch goes to the next readable training sample in store order instead, so batch
shapes, the noise draws and the batches of every other step stay what they were (a resumed run and
an uninterrupted one still read the same); the feeder collects the skipped keys and why.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from shared.cli import user_errors
from shared.head import KVPrefix
from shared.store import CachedSample, SampleReadError, Store, from_stored

BUCKET = 64  # prefix lengths are padded up to a multiple of this, so step shapes repeat


@dataclass
class Batch:
    keys: list[str]
    prefix: KVPrefix  # B prefixes, layers x (B, kv_heads, L_max, head_dim)
    action: torch.Tensor  # (B, 64, 2) normalised GT action
    hist_xyz: torch.Tensor  # (B, 16, 3)
    hist_rot: torch.Tensor  # (B, 16, 3, 3)
    fut_xyz: torch.Tensor  # (B, 64, 3)
    pending: object = None  # the CUDA feeder's deferred K/V copy (feeder.DeferredKV); None: K/V already in place

    def to(self, device) -> Batch:
        nb = device.type == "cuda" if isinstance(device, torch.device) else str(device).startswith("cuda")
        return Batch(self.keys, self.prefix.to(device), self.action.to(device, non_blocking=nb),
                     self.hist_xyz.to(device), self.hist_rot.to(device), self.fut_xyz.to(device), self.pending)

    def prepare(self) -> Batch:
        """Before the first read of prefix K/V: issue its deferred copy and make this stream wait for it."""
        if self.pending is not None:
            self.pending.prepare()
        return self

    def release(self) -> None:
        """After the last work reading prefix K/V is enqueued: its slot may be refilled once that work ran."""
        if self.pending is not None:
            self.pending.release()


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
    """Stored-form samples of a store; `skip` = store indices the feeder already holds (tiers).

    skip_bad: a sample that fails to read becomes {"bad": key, "reason", "index"} when `pool` is empty
    (the tier fill), else {"substitute": the next readable sample of `pool` (index if held), "skipped"}.
    `known_bad` = indices already found damaged (not read again)."""

    def __init__(self, url: str, skip: frozenset[int] = frozenset(), skip_bad: bool = False,
                 pool: tuple[int, ...] = (), known_bad: frozenset[int] = frozenset()):
        self.url, self.skip, self.skip_bad, self.known_bad = url, skip, skip_bad, known_bad
        self.pool = sorted(set(pool))
        self._store: Store | None = None

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, batch: list[int]) -> list[dict | int] | WorkerError:
        try:
            if self._store is None:
                self._store = Store.open(self.url, skip_damaged=self.skip_bad)
            return [self._one(i) for i in batch]
        except user_errors() as exc:
            return WorkerError.carry(exc)

    def _one(self, i: int):
        if i in self.skip:
            return i
        if not self.skip_bad:
            return read_raw(self._store, i)
        raw, why = self._try(i)
        if raw is not None:
            return raw
        if not self.pool:
            return {"bad": why[0], "reason": why[1], "index": i}
        start = int(np.searchsorted(self.pool, i, side="right"))
        for n in range(len(self.pool)):
            j = self.pool[(start + n) % len(self.pool)]
            sub = j if j in self.skip else self._try(j)[0]
            if sub is not None:
                return {"substitute": sub, "skipped": why}
        raise SampleReadError(self.url, why[0], "?", f"{why[1]}; and no training sample is readable")

    def _try(self, i: int) -> tuple[dict | None, tuple[str, str]]:
        if i in self.known_bad:
            return None, ("", "")
        return read_or_why(self._store, i)


class WorkerError:
    """A store error or bad input met in a DataLoader worker, handed back as the item: torch would re-raise
    it rebuilt from its message with the worker's traceback appended (twenty lines, a SampleReadError without
    its key); `raise_if_failed` raises the original in the main process, one line as with workers 0."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    @staticmethod
    def carry(exc: BaseException):
        """In a worker: the WorkerError to return; in the main process, or when `exc` does not survive a
        pickle round trip (it would fail on the worker's result queue), `exc` is raised as it is."""
        if get_worker_info() is None:
            raise exc
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - any failure to rebuild it: let torch wrap it
            raise exc from None
        return WorkerError(exc)


def raise_if_failed(item):
    """A DataLoader item of RawDataset -> the item, or the worker's exception raised here (WorkerError)."""
    if isinstance(item, WorkerError):
        raise item.exc
    return item


def read_or_why(store: Store, i: int) -> tuple[dict | None, tuple[str, str]]:
    """(the stored-form sample, ("", "")) or, when it does not read whole, (None, (its key, why))."""
    try:
        return read_raw(store, i), ("", "")
    except SampleReadError as exc:
        return None, (exc.key or store.manifest(i % len(store))["key"], exc.reason or str(exc))


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


def readable(store: Store, indices: list[int]) -> tuple[list[int], dict[str, str]]:
    """(the indices whose sample reads whole, {key: why} of the others): --skip-bad-samples for the
    few samples validation reads again and again."""
    good, bad = [], {}
    for i in indices:
        raw, (key, why) = read_or_why(store, i)
        if raw is not None:
            good.append(i)
        else:
            bad[key] = why
    return good, bad


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
                progress: bool = False, skip_bad: bool = False, int8_prefix: bool = False):
    """-> a `FeederLoader`: iterate for one list of `grad_accum` Batches (on `device`) per step.
    skip_bad: damaged samples are replaced (see the module docstring); `.skipped` = {key: why}."""
    from .feeder import DeviceFeeder, FeederLoader

    store = Store.open(url, skip_damaged=skip_bad)
    sampler = StepBatchSampler(indices, batch_size, seed, start, stop, rank, world_size, grad_accum)
    feeder = DeviceFeeder(store, torch.device(device), dtype, bucket, int8_prefix)
    feeder.fill_tiers(sorted(set(indices)), ram_budget_bytes, gpu_budget_bytes, num_workers, progress, skip_bad)
    ds = RawDataset(url, frozenset(feeder.held()), skip_bad, tuple(indices), frozenset(feeder.bad))
    dl = DataLoader(ds, batch_size=None, sampler=sampler,
                    collate_fn=_identity, num_workers=num_workers,
                    pin_memory=pin_memory and torch.device(device).type == "cuda",
                    prefetch_factor=4 if num_workers else None, persistent_workers=False)
    return FeederLoader(dl, feeder, grad_accum)


# -- host RAM: the plan against what is free, before anything loads ----------------------------------
def available_ram() -> int:
    """Bytes this process may still take: MemAvailable (else free pages), capped by a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            avail = min(avail, int(Path(limit).read_text()) - int(Path(used).read_text()))
        except (OSError, ValueError):  # no such cgroup file, or "max" (no limit)
            continue
    return avail


def stored_bytes(m: dict) -> int:
    """A sample's K/V as stored (codes + quantisation parameters), from its manifest."""
    return sum(math.prod(a["shape"]) * np.dtype(a["dtype"]).itemsize for n, a in m["arrays"].items()
               if n == "kv" or n.startswith("q_"))


def loader_ram_plan(store: Store, indices: list[int], batch_size: int, grad_accum: int, num_workers: int,
                    ram_budget: float, dtype_bytes: int) -> dict[str, float]:
    """Host bytes the loader holds at its peak: the RAM tier (filled up to its budget), the raw batches
    queued by the workers, and the dense batches the feeder builds (CPU) or stages."""
    mans = [store.manifest(i % len(store)) for i in sorted(set(indices))]
    per = [stored_bytes(m) for m in mans]
    s = store.spec
    dense = s.num_layers * 2 * batch_size * s.num_kv_heads * bucket_len(max(m["prefix_len"] for m in mans)) \
        * s.head_dim * dtype_bytes
    queued = (num_workers * 4 if num_workers else 1) + 2 * grad_accum  # prefetch_factor 4 per worker + pending
    return {"RAM tier": min(ram_budget, sum(per)), "queued batches": queued * batch_size * max(per),
            "dense batches": 2 * grad_accum * dense}


def check_host_ram(plan: dict[str, float], hint: str, available: int | None = None) -> None:
    """Refuse, in one line, a plan that needs more host RAM than is free (rather than be OOM-killed mid-run)."""
    need, avail = sum(plan.values()), available_ram() if available is None else available
    if need > avail:
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in plan.items() if v)
        raise ValueError(f"this plan needs about {need / 1e9:.2f} GB of host RAM ({parts} GB) but "
                         f"{avail / 1e9:.2f} GB is available; {hint}")


def train_ram_plan(cfg, store: Store, indices: list[int], head_cfg, device: torch.device,
                   dtype: torch.dtype) -> dict[str, float]:
    """head-train's host RAM: the loader plan, the host copy of weights + optimizer state each checkpoint
    takes, and on a CPU device the training itself (head_trainer/memory.py's terms)."""
    from .memory import DTYPE_BYTES, train_estimate

    name = str(dtype).removeprefix("torch.")
    plan = loader_ram_plan(store, indices, cfg.batch_size, cfg.grad_accum, cfg.num_workers, cfg.ram_cache_gb * 1e9,
                           DTYPE_BYTES[name])
    max_len = bucket_len(max(store.manifest(i % len(store))["prefix_len"] for i in indices))
    est = train_estimate(cfg, head_cfg, max_len, name, kv_slots=0)
    plan["checkpoint copy"] = est.weights + est.optimizer
    if device.type == "cpu":
        plan["training on the CPU"] = est.weights + est.gradients + est.optimizer + est.activations
    return plan
