"""What differs between the Alpamayo releases this tool reads: Alpamayo-R1 (Alpamayo 1) and Alpamayo 1.5.

Both have the same head (expert, action projections, action space; same key names and shapes). The
differences that matter to a head-only reader/writer (docs/ALPAMAYO_1_5.md):
- `model_type` / `architectures` / the `_target_` namespace of the hydra sub-configs;
- 1.5 registers the 7 buffers (3 Fourier `freqs`, 4 action-space constants) as non-persistent, so its
  model expects 409 head tensors, not 416. Whether the 1.5 *files* still hold them was not seen: a
  reader rebuilds whichever are absent (from the config, as the 1.5 constructors do) and a writer
  writes back exactly the key set the original has;
- the prompt (shared.prompt15) and guidance (shared.guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import HeadConfig

# Head buffers: persistent in R1 (in its files), non-persistent in 1.5 (rebuilt at init).
FREQS_KEYS = (
    "action_in_proj.sinus.0.freqs",
    "action_in_proj.sinus.1.freqs",
    "action_in_proj.timestep_fourier_encoder.freqs",
)
ACTION_SPACE_KEYS = tuple(f"action_space.{n}" for n in ("accel_mean", "accel_std", "curvature_mean", "curvature_std"))
BUFFER_KEYS = FREQS_KEYS + ACTION_SPACE_KEYS


@dataclass(frozen=True)
class Release:
    name: str  # short name used on the command line and in provenance: "r1" | "1.5"
    model_type: str  # config.json model_type
    architecture: str  # config.json architectures[0]
    target_namespace: str  # prefix of the alpamayo hydra `_target_`s
    persistent_buffers: bool  # True: the 7 buffers are in the file and a missing one is an error
    prompt_format: str  # which prompt builder matches the release


R1 = Release("r1", "alpamayo_r1", "AlpamayoR1", "alpamayo_r1.", True, "alpamayo_r1")
A15 = Release("1.5", "alpamayo1_5", "Alpamayo1_5", "alpamayo1_5.", False, "alpamayo1_5")
RELEASES: dict[str, Release] = {r.model_type: r for r in (R1, A15)}
BY_NAME: dict[str, Release] = {r.name: r for r in (R1, A15)}


def release_of(config: dict) -> Release:
    """The release a config.json belongs to, by `model_type`; ValueError naming the value otherwise."""
    mt = config.get("model_type")
    if mt not in RELEASES:
        raise ValueError(f"model_type={mt!r}: expected 'alpamayo_r1' (Alpamayo-R1) or 'alpamayo1_5' (Alpamayo 1.5)")
    return RELEASES[mt]


def config_targets(config: dict) -> dict[str, str]:
    """{sub-config name: `_target_`} of the hydra sub-configs (recorded, never instantiated)."""
    return {k: v["_target_"] for k, v in sorted(config.items()) if isinstance(v, dict) and "_target_" in v}


def foreign_targets(config: dict, release: Release) -> list[str]:
    """`_target_`s in another release's namespace (a half-converted config); empty when consistent."""
    others = [r.target_namespace for r in RELEASES.values() if r is not release]
    return [t for t in config_targets(config).values() if t.startswith(tuple(others))]


def rebuild_buffers(cfg: HeadConfig, keys, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The named buffers as the 1.5 constructors build them, in `dtype` (the stored weight dtype).

    freqs: logspace(0, log10(max_freq), n/2) (1, n/2) computed in fp32, then cast like `keep_same_dtype`
    casts the module; action space: the config's mean/std as 0-d tensors. The cast to the stored dtype
    mirrors `from_pretrained(dtype=...)` constructing under that default dtype (inferred, not run).
    """
    aip, asp = cfg.action_in_proj, cfg.action_space
    n = int(aip["num_fourier_feats"]) // 2
    freqs = torch.logspace(0, math.log10(float(aip["max_freq"])), steps=n, dtype=torch.float32)[None, :]
    out = {}
    for k in keys:
        if k in FREQS_KEYS:
            out[k] = freqs.to(dtype)
        elif k in ACTION_SPACE_KEYS:
            out[k] = torch.tensor(float(asp[k.split(".", 1)[1]]), dtype=torch.float32).to(dtype)
        else:
            raise KeyError(f"{k} is not a head buffer")
    return out


def complete_head_state(release: Release, cfg: HeadConfig, state: dict[str, torch.Tensor],
                        dtype: torch.dtype | None = None, keys=BUFFER_KEYS) -> dict[str, torch.Tensor]:
    """`state` plus those of `keys` (buffers) the file lacks, rebuilt in `dtype` (default: the stored
    action_out_proj dtype). 1.5 only: R1's buffers are persistent, so R1 state is returned unchanged."""
    missing = [k for k in keys if k not in state]
    if not missing or release.persistent_buffers:  # R1: left to the strict load to report
        return state
    return {**state, **rebuild_buffers(cfg, missing, dtype or state["action_out_proj.weight"].dtype)}
