"""What trains: the whole head, only the action projections, or LoRA adapters on the expert.

    all          expert + action_in_proj + action_out_proj (the official Stage-2 set)
    projections  action_in_proj + action_out_proj; the 2.3 B expert stays frozen
    lora         peft LoRA adapters on the expert's linear layers (rank, alpha, target modules);
                 the projections train too, the expert's own weights stay frozen

Saved and exported heads always carry the release's names: LoRA adapters are merged
(W + alpha/r B A) into plain `expert.*.weight` tensors when a head file is written.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.head import AlpamayoHead

MODES = ("all", "projections", "lora")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer of an expert block
ADAPTER = "default"


def apply_trainable(head: AlpamayoHead, mode: str, lora_rank: int = 16, lora_alpha: float = 16.0,
                    lora_targets: str = LORA_TARGETS, seed: int = 0) -> list[nn.Parameter]:
    """Freeze what `mode` does not train (and inject LoRA for 'lora', once: a head that has adapters keeps
    them and trains them again); -> the trainable parameters in a fixed order."""
    if mode not in MODES:
        raise ValueError(f"--trainable {mode!r}: use one of {', '.join(MODES)}")
    head.requires_grad_(mode == "all")
    if mode != "all":
        head.action_in_proj.requires_grad_(True)
        head.action_out_proj.requires_grad_(True)
    if mode == "lora" and not is_lora(head):
        from peft import LoraConfig, inject_adapter_in_model

        targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA A's initialisation is part of the run's seed
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                               target_modules=targets, bias="none"), head.expert, ADAPTER)
    if mode == "lora":
        for name, p in head.expert.named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()  # adapters are small: keep them (and their updates) in fp32
                p.requires_grad_(True)
    return [p for p in head.parameters() if p.requires_grad]


def trainable_state(head: AlpamayoHead) -> dict[str, torch.Tensor]:
    """name -> tensor of every trainable parameter (the names `apply_trainable` left in the module)."""
    return {n: p for n, p in head.named_parameters() if p.requires_grad}


def is_lora(head: AlpamayoHead) -> bool:
    return any(".lora_" in n for n, _ in head.named_parameters())


@torch.no_grad()
def official_state(head: AlpamayoHead, override: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The head's state dict under the release's names, LoRA merged into the base weights.

    `override` (name -> tensor, names as in `trainable_state`) replaces parameters first, e.g. EMA values.
    """
    override = override or {}
    sd = {k: override.get(k, v) for k, v in head.state_dict(keep_vars=True).items()}
    if not is_lora(head):
        return {k: v.detach() for k, v in sd.items()}
    from peft.tuners.lora import LoraLayer

    out = {k.replace(".base_layer.", "."): v.detach() for k, v in sd.items() if ".lora_" not in k}
    for name, mod in head.named_modules():
        if isinstance(mod, LoraLayer):
            a = sd[f"{name}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
            b = sd[f"{name}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
            w = sd[f"{name}.base_layer.weight"]
            out[f"{name}.weight"] = (w.float() + (b @ a) * mod.scaling[ADAPTER]).to(w.dtype)
    return out
