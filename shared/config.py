"""The head's configuration, read from an official Alpamayo-R1 `config.json` + the VLM's text config.

The release builds the expert as a deep copy of the VLM text config (Qwen3-VL-8B) with the
`expert_cfg` keys written over it; the action projections, action space and diffusion come from
their hydra sub-configs. We read the same keys, never instantiate `_target_` strings.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field

from .action_space import SolverWeights
from .flow_matching import FlowMatchingConfig

# Release values (alpamayo-r1-head.md §1.3, §2, §4.2): used only when a config omits a key.
RELEASE_EXPERT_OVERRIDES = {
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8256,
}
RELEASE_ACTION_IN_PROJ = {"hidden_size": 512, "num_enc_layers": 2, "max_freq": 100.0, "num_fourier_feats": 20}
RELEASE_ACTION_SPACE = {
    "accel_mean": 0.02902694707164455,
    "accel_std": 0.6810426736454882,
    "curvature_mean": 0.0002692167976330542,
    "curvature_std": 0.026148280660833106,
    "dt": 0.1,
    "n_waypoints": 64,
}


@dataclass(frozen=True)
class HeadConfig:
    """Everything needed to build the trainable head without the VLM weights."""

    expert: dict  # full Qwen3VLTextConfig dict after the expert overrides
    action_in_proj: dict = field(default_factory=lambda: dict(RELEASE_ACTION_IN_PROJ))
    action_space: dict = field(default_factory=lambda: dict(RELEASE_ACTION_SPACE))
    diffusion: FlowMatchingConfig = FlowMatchingConfig()
    solver: SolverWeights = SolverWeights()
    expert_non_causal_attention: bool = True  # release class default; True = bidirectional action block

    @classmethod
    def from_alpamayo_config(cls, alp_cfg: dict, vlm_text_cfg: dict) -> HeadConfig:
        """Release config.json (dict) + the VLM's `text_config` (dict) -> HeadConfig."""
        expert = copy.deepcopy(vlm_text_cfg)
        expert.update(alp_cfg.get("expert_cfg") or {})
        for k in ("num_key_value_heads", "head_dim", "num_hidden_layers"):
            if expert.get(k) != vlm_text_cfg.get(k) and k in vlm_text_cfg:
                raise ValueError(
                    f"expert_cfg.{k}={expert.get(k)} differs from the VLM's {vlm_text_cfg.get(k)}: the expert "
                    "attends to the VLM's per-layer KV cache, so KV heads, head_dim and layer count must match"
                )
        expert.pop("_name_or_path", None)
        aip = dict(RELEASE_ACTION_IN_PROJ)
        aip.update({k: v for k, v in (alp_cfg.get("action_in_proj_cfg") or {}).items() if k in aip})
        asp_cfg = alp_cfg.get("action_space_cfg") or {}
        asp = dict(RELEASE_ACTION_SPACE)
        asp.update({k: v for k, v in asp_cfg.items() if k in asp})
        solver = SolverWeights(**{k: v for k, v in asp_cfg.items() if k in SolverWeights.__dataclass_fields__})
        dcfg = alp_cfg.get("diffusion_cfg") or {}
        diffusion = FlowMatchingConfig(
            num_inference_steps=int(dcfg.get("num_inference_steps", 10)),
            time_sampler=str(dcfg.get("train_timestep_sampler", "beta")),
        )
        if dcfg.get("int_method", "euler") != "euler":
            raise ValueError(f"diffusion_cfg.int_method={dcfg['int_method']!r}: only 'euler' (the release) is implemented")
        return cls(
            expert=expert,
            action_in_proj=aip,
            action_space=asp,
            diffusion=diffusion,
            solver=solver,
            expert_non_causal_attention=bool(alp_cfg.get("expert_non_causal_attention", True)),
        )

    def to_dict(self) -> dict:
        return {
            "expert": self.expert,
            "action_in_proj": self.action_in_proj,
            "action_space": self.action_space,
            "diffusion": asdict(self.diffusion),
            "solver": asdict(self.solver),
            "expert_non_causal_attention": self.expert_non_causal_attention,
        }

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        return cls(
            expert=dict(d["expert"]),
            action_in_proj=dict(d["action_in_proj"]),
            action_space=dict(d["action_space"]),
            diffusion=FlowMatchingConfig(**d["diffusion"]),
            solver=SolverWeights(**d["solver"]),
            expert_non_causal_attention=bool(d["expert_non_causal_attention"]),
        )

    def hash(self) -> str:
        """Stable identity of the head architecture + constants (recorded in stores and checkpoints)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def num_layers(self) -> int:
        return int(self.expert["num_hidden_layers"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.expert["num_key_value_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.expert["head_dim"])
