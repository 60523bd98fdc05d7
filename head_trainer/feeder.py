"""Stored-form samples -> device batches: side-stream copies, GPU dequantisation, RAM and GPU tiers.

Per batch shape (B, bucketed L) the feeder owns two fixed device slots (layers, 2, B, kv_heads, L, D),
used in turn, so a CUDA-graph step sees the same input buffers again and again, and memory does not grow
with --grad-accum. A batch's K/V copy is deferred until the step is about to read it (`Batch.prepare`):
samples are then copied into the slot on a side stream (from the pinned DataLoader output, the pinned RAM
tier, or the GPU tier, which holds codes as stored), int8/int4 dequantised there a few layers at a time,
and their finiteness checked; the main stream waits on an event. The copy waits only for the slot's
previous batch (`Batch.release` records when its reads are done), so micro-batch j's copy overlaps
micro-batch j - 1's compute. The small tensors (actions, lengths) are copied on the main stream at once.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from shared import kv_quant
from shared.failpoints import failpoint
from shared.head import KVPrefix
from shared.store import Store

from .integrity import checked_tensors, finite_rows

DEQUANT_LAYERS = 4  # layers dequantised at once (bounds the fp32 temporaries)
N_SLOTS = 2  # device K/V slots per batch shape (head_trainer/memory.py's kv_slots)


def check_int8_prefix(store: Store) -> None:
    """--int8-prefix keeps int8 codes in the slots: refuse a store that holds other K/V."""
    if store.spec.quant != "int8":
        raise ValueError(f"--int8-prefix reads int8 stores; {store.url} holds {store.spec.quant!r} K/V")


class DeviceFeeder:
    """int8_prefix: an int8 store's slots hold the codes (int8) and their scales, which the split attention
    reads in place (shared/prefix_attention.py): half a bf16 slot and no dequantisation pass."""

    def __init__(self, store: Store, device: torch.device, dtype: torch.dtype | None, bucket: int,
                 int8_prefix: bool = False):
        if int8_prefix:
            check_int8_prefix(store)
        self.int8 = int8_prefix
        self.spec = store.spec
        self.url = store.url
        self.device = device
        self.dtype = dtype or self.spec.torch_dtype
        self.bucket = bucket
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.ram: dict[int, dict] = {}  # store index -> raw sample in pinned host memory
        self.gpu: dict[int, dict] = {}  # store index -> raw sample (codes as stored) on the device
        self._slots: dict[tuple[int, int], list[Slot]] = {}
        self._next: dict[tuple[int, int], int] = {}
        self.n_slots = N_SLOTS
        self.tier_bytes = {"ram": 0, "gpu": 0}
        self.skipped: dict[str, str] = {}  # key -> why, of damaged samples left out (skip_bad)
        self.bad: set[int] = set()  # their store indices, found during the tier fill

    def held(self) -> set[int]:
        return set(self.ram) | set(self.gpu)

    # -- tiers -----------------------------------------------------------------------------------
    def fill_tiers(self, indices: list[int], ram_budget: int, gpu_budget: int, workers: int, progress: bool,
                   skip_bad: bool = False) -> None:
        """Read samples once into the GPU tier (if it fits the budget), then the RAM tier, in index order."""
        if ram_budget <= 0 and not (self.cuda and gpu_budget > 0):
            return
        from .data import RawDataset, _identity, raise_if_failed, raw_nbytes

        dl = DataLoader(RawDataset(self.url, skip_bad=skip_bad), batch_size=None, sampler=[[i] for i in indices],
                        collate_fn=_identity, num_workers=workers, pin_memory=self.cuda,
                        prefetch_factor=4 if workers else None)
        bar = tqdm(total=len(indices), desc="cache tiers", unit="sample", disable=not progress)
        with bar:  # closed (its line ended) before an error is printed
            for item in dl:
                (raw,) = raise_if_failed(item)
                if "bad" in raw:
                    self.skipped[raw["bad"]] = raw["reason"]
                    self.bad.add(raw["index"])
                    bar.update(1)
                    continue
                n = raw_nbytes(raw)
                if self.cuda and self.tier_bytes["gpu"] + n <= gpu_budget:
                    self.gpu[raw["index"]] = _move(raw, self.device)
                    self.tier_bytes["gpu"] += n
                elif self.tier_bytes["ram"] + n <= ram_budget:
                    self.ram[raw["index"]] = raw if not self.cuda or raw["kv"].is_pinned() else _pin(raw)
                    self.tier_bytes["ram"] += n
                else:
                    break
                bar.update(1)

    # -- batches ---------------------------------------------------------------------------------
    def _held(self, i: int) -> dict:
        return self.gpu[i] if i in self.gpu else self.ram[i]

    def _slot(self, bsz: int, lb: int) -> Slot:
        key = (bsz, lb)
        if key not in self._slots:
            s = self.spec
            shape = (s.num_layers, 2, bsz, s.num_kv_heads, lb, s.head_dim)

            def scales():  # int8: per key channel, per value token (KVPrefix.key_scales / value_scales)
                return (torch.zeros(s.num_layers, bsz, s.num_kv_heads, s.head_dim, device=self.device),
                        torch.zeros(s.num_layers, bsz, s.num_kv_heads, lb, device=self.device))
            self._slots[key] = [Slot(torch.zeros(shape, dtype=torch.int8 if self.int8 else self.dtype,
                                                 device=self.device), scales() if self.int8 else None)
                                for _ in range(self.n_slots)]
            self._next[key] = 0
        i = self._next[key]
        self._next[key] = (i + 1) % self.n_slots
        return self._slots[key][i]

    def to_batch(self, raws: list[dict | int]):
        """A Batch of these samples; its K/V slot is assigned now and filled by `Batch.prepare`."""
        from .data import Batch, bucket_len

        raws = [self._held(r) if isinstance(r, int) else r for r in map(self._unwrap, raws)]
        bsz = len(raws)
        lb = bucket_len(max(r["L"] for r in raws), self.bucket)
        slot = self._slot(bsz, lb)  # on the CPU too (no streams there): one code path, tested on the CPU
        batch = _batch(Batch, raws, slot, self.device)  # small tensors: on the main stream, now
        batch.pending = DeferredKV(self, slot, raws, batch)
        return batch

    def _unwrap(self, r):
        """A damaged sample's replacement (data.RawDataset, skip_bad): note the skip, use the substitute."""
        if isinstance(r, dict) and "substitute" in r:
            key, why = r["skipped"]
            if key:
                self.skipped[key] = why
            return r["substitute"]
        return r

    def _place(self, slot: Slot, b: int, r: dict) -> None:
        """Write sample r's K/V into batch position b of the slot's kv (layers, 2, B, H, Lb, D): as stored
        (bf16, or int8 codes + scales with int8_prefix), else dequantised on the device."""
        kv, L = slot.kv, r["L"]
        kv[:, :, b, :, L:].zero_()  # the slot's last batch may have been longer: padding reads as zeros
        codes = r["kv"].to(self.device, non_blocking=True)
        if self.int8:  # the codes as stored, the scales beside them
            kv[:, :, b, :, :L].copy_(codes)
            ks, vs = slot.scales
            ks[:, b].copy_(r["q"]["k_scale"][:, :, 0].to(self.device, non_blocking=True))  # (l, h, D)
            vs[:, b, :, L:].zero_()
            vs[:, b, :, :L].copy_(r["q"]["v_scale"][..., 0].to(self.device, non_blocking=True))  # (l, h, L) fp16
            return
        if self.spec.quant == "none":
            kv[:, :, b, :, :L].copy_(codes)
            return
        params = {n: t.to(self.device, non_blocking=True) for n, t in r["q"].items()}
        for lo in range(0, codes.shape[0], DEQUANT_LAYERS):
            sl = slice(lo, lo + DEQUANT_LAYERS)
            q = kv_quant.QuantizedKV(codes[sl], {n: t[sl] for n, t in params.items()})
            k, v = kv_quant.dequantize_kv(q, self.spec.quant, self.dtype)
            kv[sl, 0, b, :, :L] = k
            kv[sl, 1, b, :, :L] = v


class Slot:
    """One device K/V buffer (layers, 2, B, kv_heads, L, D) (+ int8 scales: (layers, B, kv_heads, D) per key
    channel, (layers, B, kv_heads, L) per value token) and the event after which it may be refilled."""

    def __init__(self, kv: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.kv, self.scales = kv, scales
        self.free: torch.cuda.Event | None = None  # recorded on the main stream after its last reader
        self.owner: DeferredKV | None = None  # the prepared, not yet released batch


class DeferredKV:
    """A batch's K/V copy into its slot, issued by `prepare` (once) on the feeder's side stream."""

    def __init__(self, feeder: DeviceFeeder, slot: Slot, raws: list[dict], batch):
        self.feeder, self.slot, self.raws = feeder, slot, raws
        self.action = batch.action
        self.checked = checked_tensors(batch)  # slot views: finite_rows
        self.finite: torch.Tensor | None = None  # (B,) bool once prepared: every K, V, action value finite
        self.action_ready: torch.cuda.Event | None = None  # CUDA: after the action's copy on the main stream
        if feeder.cuda:  # the copy stream reads the action (its finiteness) only after that copy
            self.action_ready = torch.cuda.Event()
            self.action_ready.record(torch.cuda.current_stream(feeder.device))

    def prepare(self) -> None:
        if self.raws is None:
            return
        f = self.feeder
        if self.slot.owner is not None and self.slot.owner is not self:  # a bug, not bad data
            raise RuntimeError("a K/V slot was refilled before its previous batch was released")
        self.slot.owner = self
        if not f.cuda:
            self._fill()
            return
        main = torch.cuda.current_stream(f.device)
        if self.slot.free is not None:  # the slot's previous batch: its reads must be done
            f.side.wait_event(self.slot.free)
        f.side.wait_event(self.action_ready)
        self.action.record_stream(f.side)  # allocated on the main stream, read on the copy stream
        with torch.cuda.stream(f.side):
            self._fill()
            self.finite.record_stream(main)
            ready = torch.cuda.Event()
            ready.record(f.side)
        main.wait_event(ready)

    def _fill(self) -> None:
        for b, r in enumerate(self.raws):
            self.feeder._place(self.slot, b, r)
        self.finite = finite_rows(self.checked)
        self.raws = None  # the host copies may go

    def release(self) -> None:
        if self.slot.owner is self:
            self.slot.owner = None
        if self.feeder.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.feeder.device))
            self.slot.free = ev


def _batch(cls, raws: list[dict], slot: Slot, device: torch.device):
    nb = device.type == "cuda"

    def up(t: torch.Tensor) -> torch.Tensor:  # pinned first, so the copy never waits for the host
        return t.pin_memory().to(device, non_blocking=True) if nb else t

    def stack(name):
        return up(torch.stack([r[name] for r in raws]).float())

    kv, n = slot.kv, slot.kv.shape[0]
    prefix = KVPrefix([kv[i, 0] for i in range(n)], [kv[i, 1] for i in range(n)],
                      up(torch.tensor([r["L"] for r in raws])), up(torch.tensor([r["delta"] for r in raws])),
                      *([list(slot.scales[0]), list(slot.scales[1])] if slot.scales else []))
    return cls([r["key"] for r in raws], prefix, stack("action"), stack("hist_xyz"), stack("hist_rot"), stack("fut_xyz"))


def _move(raw: dict, device: torch.device) -> dict:
    out = dict(raw)
    out["kv"] = raw["kv"].to(device)
    out["q"] = {n: t.to(device) for n, t in raw["q"].items()}
    return out


def _pin(raw: dict) -> dict:
    out = dict(raw)
    out["kv"] = raw["kv"].pin_memory()
    out["q"] = {n: t.pin_memory() for n, t in raw["q"].items()}
    return out


class FeederLoader:
    """Iterate: one list of `grad_accum` device Batches per step, the next step's samples already read.
    On CUDA, call `prepare()` on each Batch before reading its K/V and `release()` after (head_trainer/step.py).

    `wait_s` = seconds the main thread waited for DataLoader workers (the loader bound)."""

    def __init__(self, dl: DataLoader, feeder: DeviceFeeder, grad_accum: int):
        self.dl, self.feeder, self.accum = dl, feeder, grad_accum
        self.wait_s = 0.0
        self.steps = 0
        self.skipped = feeder.skipped  # damaged samples left out so far (skip_bad): key -> why

    def __len__(self) -> int:
        return len(self.dl.batch_sampler or self.dl.sampler) // self.accum

    def __iter__(self):
        from .data import raise_if_failed

        it = iter(self.dl)
        pending = None
        while True:
            group = []
            try:
                for _ in range(self.accum):
                    t0 = time.perf_counter()
                    raws = raise_if_failed(next(it))
                    self.wait_s += time.perf_counter() - t0
                    group.append(self.feeder.to_batch(raws))
            except StopIteration:
                break
            if pending is not None:
                yield self._hand_over(pending)
            pending = group
        if pending is not None:
            yield self._hand_over(pending)

    def _hand_over(self, group):
        self.steps += 1
        failpoint("train_batch", n=self.steps)
        return group
