"""head-eval on Alpamayo 1.5 stores: with or without the route, and per guidance weight.

    head-eval --cache cache/nav --out eval_w1.json                                  # guided, w = 1 (release)
    head-eval --cache cache/nav --out eval_nonav.json --navigation none              # the no-route prompt
    head-eval --cache cache/nav --out eval_w15.json --guidance-weight 1.5 --noise-temperature 0.6

The unguided branch is the stored unguided prefix (guided KV before the route + the stored suffix);
a sample without a route is its own unguided branch, so w has no effect on it.
"""

from __future__ import annotations

import torch

from shared.guidance import GuidanceConfig, sample_actions_guided
from shared.store.nav import unguided_sample

from .data import collate, sample_item

NAVIGATION = ("as-built", "none")


def guidance_options(cfg) -> dict:
    """The non-default 1.5 evaluation options of an EvalConfig (empty = plain R1 evaluation)."""
    if cfg.navigation not in NAVIGATION:
        raise ValueError(f"--navigation {cfg.navigation!r}: use one of {', '.join(NAVIGATION)}")
    GuidanceConfig(cfg.guidance_weight, cfg.noise_temperature)  # validates the temperature
    if cfg.navigation == "none" and cfg.guidance_weight != 1.0:
        raise ValueError("--guidance-weight needs the route: drop --navigation none")
    out = {}
    if cfg.navigation != "as-built":
        out["navigation"] = cfg.navigation
    if cfg.guidance_weight != 1.0:
        out["guidance_weight"] = cfg.guidance_weight
    if cfg.noise_temperature != 1.0:
        out["noise_temperature"] = cfg.noise_temperature
    return out


def sample_guided(head, store, read: list, batch, cfg, gen: torch.Generator) -> torch.Tensor:
    """(B, K, 64, 2) sampled actions for the read samples `read` (batch = their collated guided prefixes)."""
    if not store.spec.navigation:
        raise ValueError(f"{store.url} is not an Alpamayo 1.5 store: --navigation / --guidance-weight do not apply")
    device = batch.prefix.lengths.device
    gcfg = GuidanceConfig(cfg.guidance_weight, cfg.noise_temperature)
    unguided = None
    if cfg.navigation == "none" or gcfg.active:
        unguided = collate([sample_item(unguided_sample(store, s)) for s in read]).to(device).prefix
    guided = unguided if cfg.navigation == "none" else batch.prefix
    return sample_actions_guided(head, guided, unguided if gcfg.active else None, cfg=gcfg,
                                 num_samples=cfg.num_samples, num_steps=cfg.steps, generator=gen)
