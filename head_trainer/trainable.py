"""What trains: the whole head, only the action projections, or LoRA adapters on the expert.

    all          expert + action_in_proj + action_out_proj (the official Stage-2 set)
    projections  action_in_proj + action_out_proj; the 2.3 B expert stays frozen
    lora         peft LoRA adapters on the expert's linear layers (rank, alpha, target modules);
                 the projections train too, the expert's own weights stay frozen

Saved and exported heads always carry the release's names: LoRA adapters are merged
(W + alpha/r B A) into plain `expert.*.weight` tensors when a head file is written.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared.head import AlpamayoHead

MODES = ("all", "projections", "lora")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer of an expert block
ADAPTER = "default"


def apply_trainable(head: AlpamayoHead, mode: str, lora_rank: int = 16, lora_alpha: float = 16.0,
                    lora_targets: str = LORA_TARGETS, seed: int = 0) -> list[nn.Parameter]:
    """Freeze what `mode` does not train (and inject LoRA for 'lora'); -> the trainable parameters in a fixed order."""
    if mode not in MODES:
        raise ValueError(f"--trainable {mode!r}: use one of {', '.join(MODES)}")
    head.requires_grad_(mode == "all")
    if mode != "all":
        head.action_in_proj.requires_grad_(True)
        head.action_out_proj.requires_grad_(True)
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA A's initialisation is part of the run's seed
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                               target_modules=targets, bias="none"), head.expert, ADAPTER)
        for name, p in head.expert.named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()  # adapters are small: keep them (and their updates) in fp32
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
    from peft.tuners.lora import LoraLayer

    override = override or {}
    sd = {k: override.get(k, v) for k, v in head.state_dict(keep_vars=True).items()}
    out = {k.replace(".base_layer.", "."): v.detach() for k, v in sd.items() if ".lora_" not in k}
    for name, mod in head.named_modules():
        if isinstance(mod, LoraLayer):
            a = sd[f"{name}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
            b = sd[f"{name}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
            w = sd[f"{name}.base_layer.weight"]
            out[f"{name}.weight"] = (w.float() + (b @ a) * mod.scaling[ADAPTER]).to(w.dtype)
    return out


def merged_lora_state(lora_state: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                      alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """Merge an adapter file (names as in `trainable_state`) into an official head state (for head-export)."""
    out = dict(base)
    for k, v in lora_state.items():
        if ".lora_" not in k:
            out[k] = v
    for k in [k for k in lora_state if f".lora_A.{ADAPTER}.weight" in k]:
        stem = k.split(".lora_A.")[0]
        a, b = lora_state[k].float(), lora_state[f"{stem}.lora_B.{ADAPTER}.weight"].float()
        w = base[f"{stem}.weight"]
        out[f"{stem}.weight"] = (w.float() + (b @ a) * (alpha / rank)).to(w.dtype)
    return out


def _prefix_safe_checkpoint(layer_idx: int, run, *args):
    """torch checkpoint of one expert layer whose recompute sees the same KV prefix.

    The layer appends its 64 action keys/values to the prefix cache; the backward replay would append
    them a second time, so the cache layer's tensors are put back before the replay.
    """
    cache = run.keywords.get("cache")
    if cache is None:
        return checkpoint(run, *args, use_reentrant=False)
    layer = cache.layers[layer_idx]
    keys, values = layer.keys, layer.values

    def replay(*a):
        layer.keys, layer.values = keys, values
        return run(*a)

    return checkpoint(replay, *args, use_reentrant=False)


def enable_gradient_checkpointing(head: AlpamayoHead) -> None:
    """Recompute each expert layer in backward (activations of one layer kept instead of all).

    transformers' own switch drops the cache under checkpointing (the prefix would vanish), so each
    layer is allowed to keep it and gets the prefix-safe checkpoint above.
    """
    expert = head.expert
    enable = getattr(expert, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:  # transformers releases before the rename
        expert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(expert.layers):
        if layer.gradient_checkpointing:
            layer._can_checkpoint_with_cache = True
            layer._gradient_checkpointing_func = partial(_prefix_safe_checkpoint, i)
