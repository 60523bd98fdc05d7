"""Optimizers head-train offers, and their state as safetensors (no pickles).

    adamw           torch AdamW (fused on CUDA); states in the parameter dtype; with bf16 weights the
                    update is rounded to nearest, which loses small updates (the 24 GB trap the seed hit)
    adamw8bit       torchao AdamW8bit: block-wise 8-bit states; bf16 weights get stochastic rounding
    adamw8bit-fused adamw8bit's numbers as plain-tensor state, the clip folded in; on CUDA one Triton
                    kernel per parameter (head_trainer/adam8_triton.py): B = 8 step 77.8 ms against
                    adamw8bit's 102.5 on an H100; the 24gb preset's optimizer
    adamw4bit       torchao AdamW4bit: 4-bit states; bf16 weights get stochastic rounding
    adamwfp8        torchao AdamWFp8: block-wise float8 (e4m3) states; bf16 weights get stochastic rounding
    adamw-sr        torchao AdamW, states in the parameter dtype; bf16 weights get stochastic rounding
    adamw-offload   torchao CPUOffloadOptimizer over torch AdamW: states and the step on the CPU

Which one a memory plan uses is measured (docs/TRAINING.md, bench/bench_head_train.py), not guessed.
CUDA graphs need a capturable step: `make_capturable` puts lr and step counters on the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit-fused", "adamw4bit", "adamwfp8", "adamw-sr", "adamw-offload")
BETAS = (0.9, 0.999)
EPS = 1e-8


def build_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (release recipe: AdamW betas 0.9/0.999, eps 1e-8)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not params:
        raise ValueError("no trainable parameters")
    cuda = params[0].is_cuda
    bf16 = any(p.dtype == torch.bfloat16 for p in params)
    if name == "adamw":
        kw = {"fused": True, "capturable": True} if cuda and capturable else ({"fused": True} if cuda else {"foreach": True})
        lr_arg = torch.tensor(lr, device=params[0].device) if cuda and capturable else lr
        return torch.optim.AdamW(params, lr=lr_arg, betas=BETAS, eps=EPS, weight_decay=weight_decay, **kw)
    if name == "adamw8bit-fused":
        from .adam8 import AdamW8bitFused

        return AdamW8bitFused(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, bf16_stochastic_round=bf16)
    import torchao.optim as ao

    if name == "adamw-offload":
        if not cuda:
            raise ValueError("--optimizer adamw-offload needs CUDA parameters")
        return ao.CPUOffloadOptimizer(params, torch.optim.AdamW, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    cls = {"adamw8bit": ao.AdamW8bit, "adamw4bit": ao.AdamW4bit, "adamwfp8": ao.AdamWFp8, "adamw-sr": ao._AdamW}[name]
    return cls(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, bf16_stochastic_round=bf16)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate in place (a device tensor stays the same tensor, so graphs see the change)."""
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_capturable(opt: torch.optim.Optimizer) -> None:
    """After the first (eager) step: move torchao's lr and step counters onto the parameters' device, so a
    CUDA graph replay increments them. torch's fused AdamW is built capturable and needs nothing."""
    if isinstance(opt, torch.optim.AdamW):
        return
    for group in opt.param_groups:
        dev = group["params"][0].device
        if torch.is_tensor(group["lr"]) and group["lr"].device != dev:
            group["lr"] = group["lr"].to(dev)
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "step" in st and st["step"].device != dev:
                st["step"] = st["step"].to(dev)


# -- state files ------------------------------------------------------------------------------------
def _flatten_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch / torchao optimizer state -> flat tensors + how to rebuild the quantised ones."""
    tensors, kinds = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if not torch.is_tensor(v):
                kinds[f"{pid}.{name}"] = {"scalar": v}
                continue
            if hasattr(v, "__tensor_flatten__"):  # torchao OptimState8bit / 4bit: codes, scale, qmap + attributes
                names, attributes = v.__tensor_flatten__()
                for a in names:
                    tensors[f"{pid}.{name}.{a}"] = getattr(v, a).detach().cpu().contiguous()
                kinds[f"{pid}.{name}"] = {"class": type(v).__name__, "names": list(names),
                                          "attributes": [_attr_json(a) for a in attributes]}
            else:
                tensors[f"{pid}.{name}"] = v.detach().cpu().contiguous()
    return tensors, kinds


def save_optimizer(opt: torch.optim.Optimizer, path: str | Path) -> None:
    sd = opt.state_dict()
    if "state" not in sd:  # CPUOffloadOptimizer: a dict of per-parameter optimizers
        raise ValueError("saving adamw-offload state is not supported; use another --optimizer to resume")
    tensors, kinds = _flatten_state(sd)
    groups = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(groups), "kinds": json.dumps(kinds)})


def load_optimizer(opt: torch.optim.Optimizer, path: str | Path) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    groups, kinds = json.loads(meta["param_groups"]), json.loads(meta.get("kinds", "{}"))
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, info in kinds.items():
        pid, name = key.split(".", 1)
        if "scalar" in info:
            state.setdefault(int(pid), {})[name] = info["scalar"]
            continue
        cls = _state_classes()[info["class"]]
        dev = params[int(pid)].device
        parts = {a: tensors.pop(f"{key}.{a}").to(dev) for a in info["names"]}
        state.setdefault(int(pid), {})[name] = cls.__tensor_unflatten__(
            parts, [_attr_from_json(a) for a in info["attributes"]], None, None)
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for g, cur in zip(groups, opt.param_groups):  # keep a device lr tensor a tensor
        if torch.is_tensor(cur["lr"]):
            g["lr"] = torch.tensor(g["lr"], dtype=cur["lr"].dtype, device=cur["lr"].device)
    opt.load_state_dict({"state": state, "param_groups": groups})


def _attr_json(a):
    return {"dtype": str(a).removeprefix("torch.")} if isinstance(a, torch.dtype) else (list(a) if isinstance(a, tuple | torch.Size) else a)


def _attr_from_json(a):
    return getattr(torch, a["dtype"]) if isinstance(a, dict) else (tuple(a) if isinstance(a, list) else a)


def _state_classes() -> dict[str, type]:
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    return {"OptimState8bit": OptimState8bit, "OptimState4bit": OptimState4bit, "OptimStateFp8": OptimStateFp8}
