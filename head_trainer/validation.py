"""Validation during training: a flow-matching loss with fixed draws, and a quick minADE.

The (t, noise) draws of a validation sample are a function of its key alone (drawn on the CPU from
crc32(key)), not of the step, the batch it lands in, the device or the run; so the same head gets
the same number twice and curves of different runs compare point by point. Both measures run through
the training step's expert path (`FastExpert`: the K draws, or the K sampled trajectories, of a
prefix share one pass over it).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from shared.fast_expert import FastExpert
from shared.flow_matching import euler_sample, sample_time
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
        was_training, fast = head.training, FastExpert(head)
        head.eval()
        total, n = 0.0, 0
        for batch in self._batches(self.indices):
            draws = [fixed_draws(k, self.draws, head.cfg.diffusion) for k in batch.keys]
            t = torch.stack([d[0].view(-1) for d in draws]).to(self.device)  # (B, K)
            noise = torch.stack([d[1] for d in draws]).to(self.device)  # (B, K, 64, 2)
            x = batch.action.to(self.device).float()[:, None]  # (B, 1, 64, 2)
            tt = t[..., None, None]
            pred = fast.velocity(tt * x + (1 - tt) * noise, t, batch.prefix.to(self.device))
            err = nn.functional.mse_loss(pred, x - noise, reduction="none")  # (B, K, 64, 2)
            total += float(err.double().mean(dim=(2, 3)).sum())
            n += err.shape[0] * err.shape[1]
        head.train(was_training)
        return total / max(n, 1)

    @torch.no_grad()
    def min_ade(self, head: AlpamayoHead, num_samples: int = 6, seed: int = 0) -> float:
        """Mean minADE (m) of `num_samples` sampled trajectories on the first `ade_items` samples."""
        if self.ade_items == 0:
            return float("nan")
        was_training, fast = head.training, FastExpert(head)
        head.eval()
        gen = torch.Generator().manual_seed(seed)
        vals = []
        for batch in self._batches(self.indices[: self.ade_items]):
            b = batch.to(self.device)
            bsz = b.action.shape[0]
            noise = torch.randn((bsz * num_samples, N_ACTION, 2), generator=gen).to(self.device)

            def velocity(x, t, b=b, bsz=bsz):  # x (B*S, 64, 2), t (B*S, 1, 1): the S samples share a prefix pass
                v = fast.velocity(x.view(bsz, num_samples, N_ACTION, 2), t.view(bsz, num_samples), b.prefix)
                return v.view(bsz * num_samples, N_ACTION, 2)

            actions = euler_sample(velocity, noise, head.cfg.diffusion.num_inference_steps)  # (B*S, 64, 2)
            hx = b.hist_xyz.float().repeat_interleave(num_samples, 0)
            hr = b.hist_rot.float().repeat_interleave(num_samples, 0)
            xyz, _ = head.action_space.action_to_traj(actions.float(), hx, hr)
            pred = xyz.view(bsz, num_samples, N_ACTION, 3)
            vals.append(trajectory_metrics(pred.cpu(), b.fut_xyz.cpu())["min_ade"])
        head.train(was_training)
        return float(torch.cat(vals).mean())
