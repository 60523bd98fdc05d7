"""Classifier-free guidance: w = 1 is bitwise plain sampling; w != 1 is the formula on a known field."""

from __future__ import annotations

import pytest
import torch

from shared.guidance import GuidanceConfig, mix, sample_actions_guided, sample_trajectories_guided
from shared.head import AlpamayoHead, KVPrefix


def _prefix(cfg, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randn(cfg.num_layers, cfg.num_kv_heads, L, cfg.head_dim, generator=g),
              torch.randn(cfg.num_layers, cfg.num_kv_heads, L, cfg.head_dim, generator=g), L, -20) for L in lengths]
    return KVPrefix.collate(items)


@pytest.fixture()
def head(tiny_head_cfg):
    torch.manual_seed(0)
    return AlpamayoHead(tiny_head_cfg).eval()


def test_weight_one_is_bitwise_plain_sampling(head, tiny_head_cfg):
    guided, unguided = _prefix(tiny_head_cfg, [9, 7], 1), _prefix(tiny_head_cfg, [5, 3], 2)
    plain = head.sample_actions(guided, num_samples=3, generator=torch.Generator().manual_seed(4))
    for ung in (None, unguided):
        got = sample_actions_guided(head, guided, ung, num_samples=3, generator=torch.Generator().manual_seed(4))
        assert torch.equal(got, plain)
    hx, hr = torch.zeros(2, 16, 3), torch.eye(3).expand(2, 16, 3, 3)
    ref = head.sample_trajectories(guided, hx, hr, num_samples=2, generator=torch.Generator().manual_seed(5))
    got = sample_trajectories_guided(head, guided, None, hx, hr, num_samples=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, ref)


class FieldHead:
    """velocity(x, t, prefix) = a_L * x + b_L * t: a known field depending on the prefix length."""

    class cfg:  # noqa: N801 - mimics AlpamayoHead.cfg.diffusion
        class diffusion:  # noqa: N801
            num_inference_steps = 4

    def velocity(self, x, t, prefix):
        L = prefix.lengths.view(-1, 1, 1).double()
        return (torch.sin(L) * x + torch.cos(L) * t).float()


@pytest.mark.parametrize("w", [0.0, 1.5, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_weight_mixes_the_two_branches_per_step(w, temperature):
    guided = KVPrefix([torch.zeros(2, 1, 9, 2)], [torch.zeros(2, 1, 9, 2)], torch.tensor([9, 8]), torch.zeros(2, dtype=torch.long))
    unguided = KVPrefix([torch.zeros(2, 1, 6, 2)], [torch.zeros(2, 1, 6, 2)], torch.tensor([6, 5]), torch.zeros(2, dtype=torch.long))
    got = sample_actions_guided(FieldHead(), guided, unguided, cfg=GuidanceConfig(w, temperature), num_samples=2,
                                generator=torch.Generator().manual_seed(0))
    # reference: the same noise, an explicit Euler loop with the formula, float64
    x = torch.randn((4, 64, 2), generator=torch.Generator().manual_seed(0)).double() * temperature
    lg, lu = torch.tensor([9, 9, 8, 8.0]).view(-1, 1, 1), torch.tensor([6, 6, 5, 5.0]).view(-1, 1, 1)
    for i in range(4):
        t = i / 4
        vg, vu = torch.sin(lg) * x + torch.cos(lg) * t, torch.sin(lu) * x + torch.cos(lu) * t
        x = x + 0.25 * ((1 - w) * vu + w * vg)
    torch.testing.assert_close(got.double(), x.view(2, 2, 64, 2), rtol=1e-5, atol=1e-5)


def test_errors_and_mix():
    assert torch.equal(mix(torch.tensor([1.0]), torch.tensor([3.0]), 1.5), torch.tensor([4.0]))
    with pytest.raises(ValueError, match="temperature"):
        GuidanceConfig(1.0, 0.0)
    g = KVPrefix([torch.zeros(1, 1, 3, 2)], [torch.zeros(1, 1, 3, 2)], torch.tensor([3]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="unguided prefix"):
        sample_actions_guided(FieldHead(), g, None, cfg=GuidanceConfig(1.5))
