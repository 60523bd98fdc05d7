"""Validation during training: a flow-matching loss with fixed draws, and a quick minADE.

The (t, noise) draws of a validation sample are a function of its key alone (drawn on the CPU from
crc32(key)), not of the step, the batch it lands in, the device or the run; so the same head gets
the same number twice and curves of different runs compare point by point.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from shared.flow_matching import interpolate, sample_time
from shared.head import N_ACTION, AlpamayoHead
from shared.store import Store

from .data import collate, sample_item
from .metrics import trajectory_metrics


def fixed_draws(key: str, k: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """-> t (k, 1, 1), noise (k, 64, 2) for one validation sample (CPU, fp32)."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    t = sample_time(k, cfg, gen)
    return t, torch.randn((k, N_ACTION, 2), generator=gen)


class Validator:
    def __init__(self, store: Store, indices: list[int], batch_size: int, draws: int, ade_items: int,
                 device: torch.device):
        self.store, self.indices, self.bs, self.draws = store, indices, batch_size, draws
        self.ade_items, self.device = min(ade_items, len(indices)), device

    def _batches(self, indices: list[int]):
        for i in range(0, len(indices), self.bs):
            yield collate([sample_item(self.store.read(j, with_hidden=False)) for j in indices[i:i + self.bs]])

    @torch.no_grad()
    def loss(self, head: AlpamayoHead) -> float:
        """Mean flow-matching MSE over the validation samples, `draws` fixed draws each."""
        was_training = head.training
        head.eval()
        total, n = 0.0, 0
        for batch in self._batches(self.indices):
            draws = [fixed_draws(k, self.draws, head.cfg.diffusion) for k in batch.keys]
            t = torch.cat([d[0] for d in draws]).to(self.device)  # (B*K, 1, 1)
            noise = torch.cat([d[1] for d in draws]).to(self.device)  # (B*K, 64, 2)
            action = batch.action.to(self.device).repeat_interleave(self.draws, 0)
            prefix = batch.prefix.to(self.device).repeat_interleave(self.draws)
            x_t, target = interpolate(action.float(), noise, t)
            err = nn.functional.mse_loss(head.velocity(x_t, t, prefix), target, reduction="none")
            total += float(err.double().mean(dim=(1, 2)).sum())
            n += err.shape[0]
        head.train(was_training)
        return total / max(n, 1)

    @torch.no_grad()
    def min_ade(self, head: AlpamayoHead, num_samples: int = 6, seed: int = 0) -> float:
        """Mean minADE (m) of `num_samples` sampled trajectories on the first `ade_items` samples."""
        if self.ade_items == 0:
            return float("nan")
        was_training = head.training
        head.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        vals = []
        for batch in self._batches(self.indices[: self.ade_items]):
            b = batch.to(self.device)
            pred = head.sample_trajectories(b.prefix, b.hist_xyz, b.hist_rot, num_samples, generator=gen)
            vals.append(trajectory_metrics(pred.cpu(), b.fut_xyz.cpu())["min_ade"])
        head.train(was_training)
        return float(torch.cat(vals).mean())
