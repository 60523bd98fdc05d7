"""AdamW with block-wise 8-bit states as plain tensors (`--optimizer adamw8bit-fused`).

Why: torchao's AdamW8bit (`adamw8bit`) was 53 ms of the 97 ms step at B = 8 on the H200, against a
memory-bound floor of about 5 ms (10 bytes per parameter). Here the state is plain tensors (codes uint8
(n,), scales fp32 (n / 256,)) and each parameter's update reads p, g and the codes once and writes p,
codes and scales once; the gradient-clipping factor is an input, so the gradients are never rewritten
(`clip_and_step`).

Backends: `triton` (CUDA default) runs head_trainer/adam8_triton.py, one kernel per parameter: the whole
head's update in 33 ms on an H100 (B = 8 step 77.8 ms against torchao's 102.5); `compile` runs the torch
functions below through inductor (138.6 ms on an H100: its kernels were the slow part, why was never
profiled); `eager` (the CPU default) runs them as they are. Tensors under 4096 elements go through the
compiled torch function in every CUDA backend.

Same numbers as torchao's AdamW8bit: the same dynamic quantisation maps (bitsandbytes' signed map for
the first moment, unsigned for the second), block 256, the same nearest-code rule, the same AdamW order
of operations, and bf16 stochastic rounding of the weights by the same bit trick. Tensors under 4096
elements, or not a multiple of the block, keep their moments in the parameter dtype, as torchao does.
tests/test_adam8.py holds the torch path equal to torchao in fp32, and the Triton kernel (under Triton's
CPU interpreter) equal to the torch path.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 256
MIN_QUANTISED = 4096
BACKENDS = ("triton", "compile", "eager")


def default_backend(device: torch.device, compile: bool | None = None) -> str:
    """triton on CUDA when Triton imports, else inductor on CUDA, eager torch ops on the CPU."""
    if compile is False or (compile is None and device.type != "cuda"):
        return "eager"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "compile"
    return "triton" if device.type == "cuda" else "compile"


def dynamic_map(signed: bool) -> list[float]:
    """bitsandbytes' dynamic (exponent + linear fraction) 8-bit map, sorted: 256 values in [-1, 1] / [0, 1]."""
    data: list[float] = []
    exp_bits, non_sign = 7, 7
    for i in range(exp_bits):
        n = 2 ** (i + non_sign - exp_bits) + 1 if signed else 2 ** (i + non_sign - exp_bits + 1) + 1
        bounds = torch.linspace(0.1, 1, n)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (-(exp_bits - 1) + i)).tolist()
        data += means + ([-x for x in means] if signed else [])
    data += [0.0, 1.0]
    assert len(data) == 256
    return sorted(data)


def quantise(x: Tensor, qmap: Tensor) -> Tensor:
    """Nearest code of x (already divided by its block's absmax) in the sorted 256-entry qmap: 8 probes."""
    codes = torch.where(x >= qmap[128], 128, 0)
    for s in (64, 32, 16, 8, 4, 2, 1):
        codes = codes + torch.where(x >= qmap[codes + s], s, 0)
    up = (codes + 1).clamp(max=255)
    lo, hi = qmap[codes], qmap[up]
    return torch.where(x - lo >= (hi - lo) * 0.5, up, codes).to(torch.uint8)


def bf16_stochastic(x: Tensor) -> Tensor:
    """fp32 -> bf16, rounding away from zero with probability (low 16 bits) / 2^16: unbiased."""
    bits = x.view(torch.int32)
    rand = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32)
    trunc = bits & -65536  # 0xFFFF0000 as a signed int32
    return torch.where(rand < (bits & 0xFFFF), trunc + 0x10000, trunc).view(torch.float32).bfloat16()


def _adamw(pf: Tensor, gf: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: Tensor, beta1: float, beta2: float,
           eps: float, wd: float) -> tuple[Tensor, Tensor, Tensor]:
    """torchao single_param_adam's AdamW in fp32: decay, moments (lerp), bias-corrected update."""
    pf = pf - lr * wd * pf
    m = m.lerp(gf, 1 - beta1)
    v = v.lerp(gf.square(), 1 - beta2)
    denom = v.sqrt() / (1 - beta2**step).sqrt() + eps
    return pf - lr * (m / (1 - beta1**step)) / denom, m, v


def update_q8(p: Tensor, g: Tensor, coef: Tensor, step: Tensor, m_codes: Tensor, m_scale: Tensor, v_codes: Tensor,
              v_scale: Tensor, qm: Tensor, qv: Tensor, lr: Tensor, beta1: float, beta2: float, eps: float, wd: float,
              sr: bool) -> None:
    """One parameter's update with 8-bit moments. p, g: any shape (n = k * 256 elements); codes (n,); scales (k,)."""
    gf = g.float().view(-1, BLOCK) * coef
    m = qm[m_codes.view(-1, BLOCK).int()] * m_scale[:, None]
    v = qv[v_codes.view(-1, BLOCK).int()] * v_scale[:, None]
    pf, m, v = _adamw(p.float().view(-1, BLOCK), gf, m, v, step, lr, beta1, beta2, eps, wd)
    ms, vs = m.abs().amax(-1).clip(1e-12), v.abs().amax(-1).clip(1e-12)
    m_codes.copy_(quantise(m / ms[:, None], qm).view(-1))
    v_codes.copy_(quantise(v / vs[:, None], qv).view(-1))
    m_scale.copy_(ms)
    v_scale.copy_(vs)
    p.copy_((bf16_stochastic(pf) if sr else pf).view(p.shape))


def update_plain(p: Tensor, g: Tensor, coef: Tensor, step: Tensor, m: Tensor, v: Tensor, lr: Tensor, beta1: float,
                 beta2: float, eps: float, wd: float, sr: bool) -> None:
    """One small parameter's update, moments in the parameter dtype (torchao's rule for small tensors)."""
    pf, mf, vf = _adamw(p.float(), g.float() * coef, m.float(), v.float(), step, lr, beta1, beta2, eps, wd)
    m.copy_(mf)
    v.copy_(vf)
    p.copy_(bf16_stochastic(pf) if sr else pf)


class AdamW8bitFused(torch.optim.Optimizer):
    """AdamW with torchao AdamW8bit's numbers and one kernel per parameter; capturable in a CUDA graph
    (lr and step counters live on the parameters' device). `compile=None` compiles on CUDA only."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bf16_stochastic_round: bool = True, compile: bool | None = None, backend: str | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        first = self.param_groups[0]["params"][0]
        self.sr = bf16_stochastic_round
        self.backend = backend or default_backend(first.device, compile)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        for group in self.param_groups:
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=first.device)
        dev = first.device
        self._qm = torch.tensor(dynamic_map(True), dtype=torch.float32, device=dev)
        self._qv = torch.tensor(dynamic_map(False), dtype=torch.float32, device=dev)
        self._one = torch.ones((), device=dev)
        fns = (update_q8, update_plain)
        compiled = self.backend in ("compile", "triton")  # the few small tensors go through inductor
        self._q8, self._plain = (torch.compile(f, fullgraph=True, dynamic=False) for f in fns) if compiled else fns
        if self.backend == "triton":
            from .adam8_triton import code_tables, update_q8_triton

            self._q8_triton = update_q8_triton
            self._bm, self._bv = code_tables(self._qm, True), code_tables(self._qv, False)
        self._salt = {id(p): i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}

    @staticmethod
    def quantised(p: Tensor) -> bool:
        return p.numel() >= MIN_QUANTISED and p.numel() % BLOCK == 0

    def _state(self, p: Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if self.quantised(p):
                n = p.numel()
                for k in ("m", "v"):
                    st[f"{k}_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                    st[f"{k}_scale"] = torch.zeros(n // BLOCK, dtype=torch.float32, device=p.device)  # zero moments
            else:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every state tensor but the step to the parameter dtype (bf16); the codes stay uint8
        and the block scales fp32."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, st in state_dict["state"].items():
            for k in ("m_codes", "v_codes", "m_scale", "v_scale"):
                if k in st:
                    self.state[params[pid]][k] = st[k].to(params[pid].device)

    @torch.no_grad()
    def step(self, closure=None):
        return self._update(self._one, closure)

    @torch.no_grad()
    def clip_and_step(self, max_norm: float) -> Tensor:
        """clip_grad_norm_(max_norm) folded into the update: the gradients are read for the norm and once in
        the update, never rewritten. Returns the total norm before clipping (0-dim, on the device)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm != float("inf") else self._one
        self._update(coef.float(), None)
        return norm

    def _update(self, coef: Tensor, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch._dynamo.utils.disable_cache_limit():
            for group in self.param_groups:
                live = [p for p in group["params"] if p.grad is not None]
                states = [self._state(p) for p in live]
                if not live:
                    continue
                torch._foreach_add_([s["step"] for s in states], 1.0)
                b1, b2 = group["betas"]
                hyper = (group["lr"], b1, b2, group["eps"], group["weight_decay"])
                if self.backend == "triton":
                    steps = torch.stack([s["step"] for s in states])  # (n_params,): bias corrections once
                    c1, c2 = 1 - b1**steps, (1 - b2**steps).sqrt()
                for i, (p, st) in enumerate(zip(live, states)):
                    sr = self.sr and p.dtype == torch.bfloat16
                    if "m_codes" in st and self.backend == "triton":
                        self._q8_triton(p.detach(), p.grad, coef, group["lr"], c1[i], c2[i], st["step"],
                                        st["m_codes"], st["m_scale"], st["v_codes"], st["v_scale"], self._qm,
                                        self._qv, self._bm, self._bv, self._salt[id(p)], b1, b2, group["eps"],
                                        group["weight_decay"], sr)
                    elif "m_codes" in st:
                        self._q8(p.detach(), p.grad, coef, st["step"], st["m_codes"], st["m_scale"], st["v_codes"],
                                 st["v_scale"], self._qm, self._qv, *hyper, sr)
                    else:
                        self._plain(p.detach(), p.grad, coef, st["step"], st["m"], st["v"], *hyper, sr)
        return loss
