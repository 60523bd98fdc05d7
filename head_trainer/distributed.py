"""Data parallel over processes started by `accelerate launch` (or `torchrun`).

    accelerate launch --num_processes 8 -m head_trainer.head_train --cache ... --batch-size 4

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; each process takes
GPU LOCAL_RANK (or the CPU, over gloo). Global batch = per-device batch x processes x --grad-accum:
rank r reads its disjoint slice of the same global order, gradients are averaged before the clip
and the update, so every rank holds the same weights; rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_ELEMS = 1 << 26  # all-reduce gradients in buckets of <= 64 M elements (bounded extra memory)


@dataclass
class Launch:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> Launch:
    """Rank / world size from the launcher's environment (1 process when none is set)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return Launch(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(launch: Launch, device: torch.device) -> None:
    if launch.size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # collectives on the current device are this rank's
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.size,
                                device_id=device if device.type == "cuda" else None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over the ranks (flattened per dtype, in buckets)."""
    size = dist.get_world_size()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        bucket: list[torch.Tensor] = []
        for i, t in enumerate(ts):
            bucket.append(t)
            if sum(b.numel() for b in bucket) >= BUCKET_ELEMS or i == len(ts) - 1:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                flat /= size
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket = []


def agree(ok: bool) -> bool:
    """True on every rank iff `ok` on every rank (so one rank's refusal stops all of them)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
