"""One optimiser step of the head: flow-matching loss over micro-batches, all-reduce, clip, update.

The (t, noise) draws are a pure function of (seed, step, global sample position), drawn on the CPU:
a resumed run, a 2-rank run at the same global batch and a CUDA-graph run all see the same draws.
Global position of local sample b of micro-batch m on rank r: (m * world + r) * B + b.

On CUDA with `cuda_graphs`, the first `warmup` steps run eagerly (they are real steps), then the
forward + backward of a micro-batch is captured once per (shape, input buffer) and the clip +
optimiser update once; later steps only copy the small inputs and replay, so the host does the same
few launches whatever the number of layers, and never waits for the GPU (the loss is read only when
the caller calls `.item()`).

Gradients in graph mode live in one static buffer per parameter that every captured graph writes.
Inside a capture each parameter's gradient is a fresh tensor that a post-accumulate hook moves into
the buffer: with one micro-batch it is copied over the buffer (no zeroing, no read of the old value:
about 9 GB less traffic per step for the release head than zero + accumulate), with several it is
added after one zeroing per step. With `fused_wgrad` the expert's linear weights skip that hand-over:
their backward GEMMs accumulate straight into the buffers (zeroed once a step), in graph and eager steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shared.fast_expert import FUSED_WGRAD_LINEARS, FastExpert, action_mask
from shared.flow_matching import sample_time
from shared.head import N_ACTION, AlpamayoHead, KVPrefix

from .optim import make_capturable, set_lr


@dataclass
class World:
    """This process's place in a data-parallel run; all_reduce averages gradients in place."""

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[list[torch.Tensor]], None] | None = None


@dataclass
class StepConfig:
    seed: int = 42
    draws: int = 1  # (t, noise) draws per prefix, in one expert pass
    grad_clip: float = 1.0  # max grad norm (0 = off)
    grad_accum: int = 1  # micro-batches per step
    compile: bool = False  # torch.compile one decoder layer (reused by all layers)
    cuda_graphs: bool = False  # capture forward+backward and the update as CUDA graphs (CUDA only)
    checkpoint: bool = False  # recompute expert layers in backward (activation memory)
    recompute_attention: bool = False  # recompute only the attention core (no saved prefix copy per layer)
    attention: str = "sdpa"  # sdpa over [prefix; action] | split: the prefix read in place (shared/prefix_attention.py)
    fused_wgrad: bool = False  # expert linears accumulate dW straight into the gradient buffers (no copy / add)
    warmup: int = 2  # eager steps before capture (CUDA graphs)


@dataclass
class StepStats:
    loss: torch.Tensor  # 0-dim, on the device: mean flow-matching loss of the global batch (this rank's share)
    grad_norm: torch.Tensor  # 0-dim, before clipping


@contextlib.contextmanager
def _no_stale_streams():
    """Newer torch can also re-point a stale AccumulateGrad stream at the capturing one; a no-op where it cannot."""
    override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    if override is not None:
        override(True)
    try:
        yield
    finally:
        if override is not None:
            override(False)


def draw_noise(seed: int, step: int, n: int, draws: int, fm_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (n, K), noise (n, K, 64, 2)) for the n samples of a global batch, sample-major, on the CPU."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    t = sample_time(n * draws, fm_cfg, gen).view(n, draws)
    noise = torch.randn((n * draws, N_ACTION, 2), generator=gen).view(n, draws, N_ACTION, 2)
    return t, noise


def flow_loss(fast: FastExpert, action: torch.Tensor, prefix: KVPrefix, t: torch.Tensor, noise: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of predicted vs target velocity. action (B, 64, 2); t (B, K); noise (B, K, 64, 2)."""
    x = action.float()[:, None]
    tt = t[..., None, None]
    x_t, target = tt * x + (1 - tt) * noise, x - noise
    return nn.functional.mse_loss(fast.velocity(x_t, t, prefix, mask), target)


class TrainStep:
    def __init__(self, head: AlpamayoHead, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                 cfg: StepConfig, world: World | None = None):
        self.head, self.params, self.opt, self.cfg = head, params, opt, cfg
        self.world = world or World()
        self.fast = FastExpert(head, compile=cfg.compile, checkpoint=cfg.checkpoint,
                               recompute_attention=cfg.recompute_attention, attention=cfg.attention)
        self.device = params[0].device
        self.graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self._eager_steps = 0
        self._fb: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}  # per (shape, KV buffer)
        self._opt_graph: torch.cuda.CUDAGraph | None = None
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._loss_sum: torch.Tensor | None = None
        self._gnorm: torch.Tensor | None = None
        # params whose static gradient no capture's hook overwrites (unused by some graph, or filled by a
        # --fused-wgrad GEMM that adds into it): zeroed before each step's replays
        self._unwritten: set[int] = set()
        self._zero: list[torch.Tensor] = []  # gradients zeroed before each step's replays
        self._wgrad = self._wgrad_buffers(cfg.fused_wgrad)  # param -> the buffer its GEMM fills

    def _wgrad_buffers(self, on: bool) -> dict[nn.Parameter, torch.Tensor]:
        """--fused-wgrad: a gradient buffer per trainable expert linear weight (FUSED_WGRAD_LINEARS), given to
        the module, whose backward GEMM accumulates dW into it (shared/fast_expert._LinearWgradInto). The
        buffer is the parameter's .grad for the all-reduce, clip and update, so no fresh gradient is copied or
        added into place per micro-batch. Plain nn.Linear weights only (LoRA and frozen layers keep autograd's
        path)."""
        trainable = {id(p) for p in self.params}
        out = {}
        for layer in self.head.expert.layers:
            for name in FUSED_WGRAD_LINEARS:
                mod = layer.get_submodule(name)
                mod.__dict__.pop("wgrad_into", None)  # a step built on this head before (benches reuse heads)
                if on and type(mod) is nn.Linear and mod.bias is None and id(mod.weight) in trainable:
                    mod.wgrad_into = torch.zeros_like(mod.weight)
                    out[mod.weight] = mod.wgrad_into
        if on and not out:
            raise ValueError("--fused-wgrad needs trainable expert linear weights (--trainable all)")
        return out

    # -- the pieces ------------------------------------------------------------------------------
    def _slice(self, m: int, bsz: int) -> slice:
        start = (m * self.world.size + self.world.rank) * bsz
        return slice(start, start + bsz)

    def _clip_and_update(self) -> torch.Tensor:
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if hasattr(self.opt, "clip_and_step"):  # the clip factor folded into the update (adamw8bit-fused)
            return self.opt.clip_and_step(clip)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        self.opt.step()
        return gnorm

    def _reduce(self) -> None:
        if self.world.size > 1:
            self.world.all_reduce([p.grad for p in self.params])

    def __call__(self, micro: list, lr: float, step: int) -> StepStats:
        if len(micro) != self.cfg.grad_accum:
            raise ValueError(f"expected {self.cfg.grad_accum} micro-batches, got {len(micro)}")
        set_lr(self.opt, lr)
        bsz = micro[0].action.shape[0]
        n_global = bsz * self.world.size * len(micro)
        t_all, eps_all = draw_noise(self.cfg.seed, step, n_global, self.cfg.draws, self.head.cfg.diffusion)
        if self.device.type == "cuda":  # pinned, so the copies below never wait for the GPU
            t_all, eps_all = t_all.pin_memory(), eps_all.pin_memory()
        if self.graphs and self._eager_steps >= self.cfg.warmup:
            return self._replay(micro, t_all, eps_all, bsz)
        stats = self._eager(micro, t_all, eps_all, bsz)
        self._eager_steps += 1
        return stats

    def _eager(self, micro, t_all, eps_all, bsz) -> StepStats:
        self.opt.zero_grad(set_to_none=True)
        if self._wgrad:
            torch._foreach_zero_(list(self._wgrad.values()))
            for p, buf in self._wgrad.items():
                p.grad = buf
        total = torch.zeros((), device=self.device)
        for m, b in enumerate(micro):
            sl = self._slice(m, bsz)
            t, eps = t_all[sl].to(self.device, non_blocking=True), eps_all[sl].to(self.device, non_blocking=True)
            loss = flow_loss(self.fast, b.action, b.prepare().prefix, t, eps)
            (loss / len(micro)).backward()
            b.release()
            total += loss.detach() / len(micro)
        self._reduce()
        gnorm = self._clip_and_update()
        if self.graphs:
            make_capturable(self.opt)
        return StepStats(total, gnorm)

    # -- CUDA graphs -----------------------------------------------------------------------------
    def _capture_stream(self) -> torch.cuda.Stream:
        """One stream for the warm-up passes and every capture.

        Autograd runs a leaf's AccumulateGrad on the stream it was created on; a node kept alive from a
        warm-up pass on some other stream (peft's LoRA adapters keep theirs) then launches work the capture
        never joins ("capturing stream has unjoined work"). Warming up on the capture stream itself keeps
        that stream inside the capture."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _capture_fb(self, b) -> tuple[torch.cuda.CUDAGraph, dict]:
        """Capture loss + backward for this batch's shapes, reading its KV tensors in place.

        Called before the step's gradients are zeroed: the warm-up pass's gradients are discarded."""
        dev = self.device
        k = self.cfg.draws
        st = {"action": b.action.to(dev).clone(), "t": torch.zeros(b.action.shape[0], k, device=dev),
              "eps": torch.zeros(b.action.shape[0], k, N_ACTION, 2, device=dev),
              "lengths": b.prefix.lengths.to(dev).clone(), "deltas": b.prefix.rope_deltas.to(dev).clone(),
              "scale": torch.ones((), device=dev)}
        prefix = dataclasses.replace(b.prefix, lengths=st["lengths"], rope_deltas=st["deltas"])  # K/V (+ scales) in place
        if self._loss_sum is None:
            self._loss_sum = torch.zeros((), device=dev)
        side = self._capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one warm-up pass of this shape outside capture (lazy initialisations)
            mask = action_mask(prefix, k, self.head.dtype, self.head.causal)
            flow_loss(self.fast, st["action"], prefix, st["t"], st["eps"], mask).backward()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # the graph's private pool cannot reuse blocks cached by eager steps (or the side stream): hand
        # them back first (on the H200 this changed no peak: B=8, L=2,993 still did not fit 24 GiB, since
        # in graph mode the gradients stay allocated beside the activations; docs/PERFORMANCE.md)
        torch.cuda.empty_cache()
        static = [p.grad for p in self.params]  # the buffers the optimiser graph reads
        overwrite = self.cfg.grad_accum == 1
        written: set[int] = set()
        # --fused-wgrad weights' GEMMs add into their static buffers themselves (no gradient reaches a hook):
        # no hook, so they count as unwritten below and are zeroed before every step's replays
        assert all(p.grad is buf for p, buf in self._wgrad.items())

        def sink(p: torch.Tensor, buf: torch.Tensor, i: int) -> None:
            buf.copy_(p.grad) if overwrite else buf.add_(p.grad)
            p.grad = None
            written.add(i)

        hooks = [p.register_post_accumulate_grad_hook(lambda p, b=b, i=i: sink(p, b, i))
                 for i, (p, b) in enumerate(zip(self.params, static)) if p not in self._wgrad]
        for p in self.params:
            p.grad = None
        g = torch.cuda.CUDAGraph()
        try:
            with _no_stale_streams(), torch.cuda.graph(g, pool=self._pool, stream=side,
                                                             capture_error_mode="thread_local"):
                mask = action_mask(prefix, k, self.head.dtype, self.head.causal)
                loss = flow_loss(self.fast, st["action"], prefix, st["t"], st["eps"], mask)
                (loss * st["scale"]).backward()
                self._loss_sum += loss.detach() * st["scale"]
        finally:
            for h in hooks:
                h.remove()
            for p, b in zip(self.params, static):
                p.grad = b
        self._unwritten |= set(range(len(static))) - written
        self._zero = [b for i, b in enumerate(static) if not overwrite or i in self._unwritten]
        self._pool = g.pool()
        return g, st

    def _capture_opt(self) -> None:
        """Capture clip + update (the eager steps before it ran the same code, so nothing initialises lazily)."""
        self._opt_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._opt_graph, pool=self._pool, stream=self._capture_stream(),
                              capture_error_mode="thread_local"):
            self._gnorm = self._clip_and_update()
        self._pool = self._opt_graph.pool()

    @staticmethod
    def _key(b) -> tuple:
        return tuple(b.prefix.keys[0].shape), b.prefix.keys[0].data_ptr(), b.prefix.values[0].data_ptr()

    def _replay(self, micro, t_all, eps_all, bsz) -> StepStats:
        if any(p.grad is None for p in self.params):
            raise RuntimeError("CUDA-graph steps need gradients from an eager step first")
        for b in micro:  # new shapes / input slots are captured before this step's gradients exist
            if self._key(b) not in self._fb:
                if len(self._fb) >= 16:
                    raise RuntimeError("more than 16 distinct batch shapes/buffers: use bucketed loader slots")
                self._fb[self._key(b)] = self._capture_fb(b)
        if self._zero:
            torch._foreach_zero_(self._zero)
        self._loss_sum.zero_()
        for m, b in enumerate(micro):
            g, st = self._fb[self._key(b)]
            sl = self._slice(m, bsz)
            st["action"].copy_(b.action, non_blocking=True)
            st["t"].copy_(t_all[sl], non_blocking=True)
            st["eps"].copy_(eps_all[sl], non_blocking=True)
            st["lengths"].copy_(b.prefix.lengths, non_blocking=True)
            st["deltas"].copy_(b.prefix.rope_deltas, non_blocking=True)
            st["scale"].fill_(1.0 / len(micro))
            b.prepare()  # its K/V copy into the slot the graph reads (overlapping the previous replay)
            g.replay()
            b.release()
        self._reduce()
        if self._opt_graph is None:
            self._capture_opt()  # capture only records: the replay below runs this step's update
        self._opt_graph.replay()
        return StepStats(self._loss_sum.clone(), self._gnorm.clone())
