"""Peak GPU memory of a head-train plan, estimated before any model loads (`--gpu-memory-budget`).

Terms (bytes): weights, gradients and optimizer states of the trainable parameters; the frozen
weights; the feeder's KV input slots; saved activations (per expert layer and token, plus the
[prefix; action] K/V each layer's attention keeps for backward, unless layers are checkpointed);
and a fixed allowance for the CUDA context-free workspace the allocator holds (cuBLAS, fragments).
Eager single-micro-batch steps free the gradients before the forward, so their peak holds the larger of
gradients and activations; CUDA graphs and gradient accumulation keep both. bench/bench_head_train.py
prints the estimate beside the measured peak for every configuration (docs/PERFORMANCE.md: eager peaks
+1-3 %, CUDA-graph peaks on the H100 and H200 -2 % to +4 %).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from shared.config import HeadConfig
from shared.head import N_ACTION

from .optim import OPTIMIZERS
from .trainable import LORA_TARGETS

DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "int8": 1}
# the caching allocator reserves more than the allocated peak (0.6-3.1 GiB more in the H200 runs) and
# plans estimated at 22.6-22.7 GiB ran out of memory under a 24 GiB cap: accept at most 90 % of a budget
BUDGET_FRACTION = 0.90
WORKSPACE_BYTES = 0.6e9  # allocator slack + cuBLAS / attention workspaces (an allowance; the H200 fits need <= this)
# a torch.compile'd layer saves about 2/3 of the eager per-token tensors (inductor recomputes fused pointwise
# results in the backward instead of keeping them): fitted to the slopes of the graph-mode peaks in
# docs/bench_head_train_step_{h100,h200}.json (+512 tokens: +1.8 GiB measured against 2.7 estimated eager),
# which leaves every graph row of both tables between -2 % and +4 % of its peak (docs/PERFORMANCE.md)
COMPILED_PER_TOKEN = 2 / 3


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    kv_inputs: float
    activations: float
    workspace: float = WORKSPACE_BYTES
    # False: the gradients are freed before each forward (eager, one micro-batch: zero_grad(set_to_none))
    # and fill in as the activations are freed, so the peak holds the larger of the two, not both
    grads_persist: bool = True

    @property
    def total(self) -> float:
        grads_acts = (self.gradients + self.activations if self.grads_persist
                      else max(self.gradients, self.activations))
        return self.weights + self.optimizer + self.kv_inputs + self.workspace + grads_acts

    def describe(self) -> str:
        gib = 2**30
        parts = ", ".join(f"{k} {v / gib:.1f}" for k, v in asdict(self).items() if k != "grads_persist")
        return f"{self.total / gib:.1f} GiB ({parts})"


def state_bytes_per_param(optimizer: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter: two moments in the parameter dtype, or quantised."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    q8 = 2.0 + 8 / 256  # two uint8 codes + one fp32 scale per 256-block for each moment
    return {"adamw": 2.0 * param_bytes, "adamw-sr": 2.0 * param_bytes, "adamw8bit": q8, "adamw8bit-fused": q8,
            "adamwfp8": 2.0 + 8 / 256, "adamw4bit": 1.0 + 8 / 128, "adamw-offload": 0.0}[optimizer]


def activation_bytes(cfg: HeadConfig, batch: int, draws: int, max_len: int, act_bytes: int,
                     checkpoint: bool, recompute_attention: bool = False, frozen_expert: bool = False,
                     split_attention: bool = False, compiled: bool = False) -> float:
    """Saved tensors of the backward pass for B prefixes x K draws of 64 tokens. frozen_expert
    (`--trainable projections`): the expert's linear layers need no weight gradient, so autograd does not
    keep their inputs that nothing else reads (both normed layer inputs and the MLP product; the attention
    output stays, flash attention's backward reads it). split_attention (`--attention split`): the prefix
    is read in place, so no layer copies it (the action block's fp32 scores are counted per token).
    compiled (`--compile`): COMPILED_PER_TOKEN of the per-token tensors."""
    e = cfg.expert
    hidden, inter = int(e["hidden_size"]), int(e["intermediate_size"])
    q_dim = int(e["num_attention_heads"]) * cfg.head_dim
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    tokens = batch * draws * N_ACTION
    # per token per layer: norms (fp32 inside), q/k/v and their normed/rotated forms, attention output,
    # residuals, and the MLP's gate / up / activation / product
    per_token = act_bytes * (8 * hidden + 4 * q_dim + 6 * kv_dim + 4 * inter) + 4 * (2 * hidden + q_dim + kv_dim)
    if frozen_expert:
        per_token -= act_bytes * (2 * hidden + inter)
    if compiled:
        per_token *= COMPILED_PER_TOKEN
    prefix_copy = batch * 2 * kv_dim * (max_len + draws * N_ACTION) * act_bytes  # [prefix; action] K and V
    if split_attention:  # no copy; per token: fp32 output + lse of the prefix part, the action block's scores
        prefix_copy = 0
        per_token += 4 * (q_dim + int(e["num_attention_heads"]) * (1 + draws * N_ACTION))
    per_layer = tokens * per_token + prefix_copy
    layers = cfg.num_layers
    if checkpoint:  # only each layer's input is kept; one layer's tensors live during its recompute
        return layers * tokens * hidden * act_bytes + per_layer
    if recompute_attention:  # the copy is made again in the backward, one layer at a time
        return layers * tokens * per_token + prefix_copy
    return layers * per_layer


def grads_persist(cuda_graphs: bool, grad_accum: int) -> bool:
    """Whether gradients are held through the forward: CUDA graphs keep them allocated, and with
    accumulation the next micro-batch runs beside them; an eager single step frees them first."""
    return cuda_graphs or grad_accum > 1


def estimate(cfg: HeadConfig, n_params: int, n_trainable: int, dtype: str, optimizer: str, batch: int,
             max_len: int, draws: int = 1, kv_slots: int = 2, checkpoint: bool = False,
             kv_dtype: str = "bfloat16", recompute_attention: bool = False,
             grads_persist: bool = True, trainable: str = "all", attention: str = "sdpa",
             compiled: bool = False) -> MemoryEstimate:
    pb = DTYPE_BYTES[dtype]
    kv_batch = cfg.num_layers * 2 * batch * cfg.num_kv_heads * max_len * cfg.head_dim * DTYPE_BYTES[kv_dtype]
    if kv_dtype == "int8":  # fp32 scales: per key channel and per value token (KVPrefix.key_scales)
        kv_batch += cfg.num_layers * batch * cfg.num_kv_heads * (cfg.head_dim + max_len) * 4
    return MemoryEstimate(
        weights=n_params * pb,
        gradients=n_trainable * pb,
        optimizer=n_trainable * state_bytes_per_param(optimizer, pb),
        kv_inputs=kv_slots * kv_batch,
        activations=activation_bytes(cfg, batch, draws, max_len, pb, checkpoint, recompute_attention,
                                     frozen_expert=trainable == "projections", split_attention=attention == "split",
                                     compiled=compiled),
        grads_persist=grads_persist,
    )


def parse_bytes(text: str) -> float:
    """'24GiB', '24 GB', '20e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*(GiB|GB|MiB|MB|G|)\s*", str(text))
    if not m:
        raise ValueError(f"--gpu-memory-budget {text!r}: use e.g. 24GiB, 24GB or 2.4e10")
    scale = {"GiB": 2**30, "GB": 1e9, "G": 1e9, "MiB": 2**20, "MB": 1e6, "": 1}[m.group(2)]
    return float(m.group(1)) * scale


def check_budget(est: MemoryEstimate, budget: float, batch: int, checkpoint: bool, optimizer: str,
                 recompute_attention: bool = False, attention: str = "sdpa", int8_store: bool = False,
                 int8_prefix: bool = False) -> None:
    """Refuse a plan whose estimated peak exceeds BUDGET_FRACTION of the budget, in one line that names
    what to change."""
    if est.total <= BUDGET_FRACTION * budget:
        return
    hints = []
    if int8_store and attention == "split" and not int8_prefix:  # half the K/V slots, no compute
        hints.append("--int8-prefix")
    if not checkpoint and attention != "split":  # split keeps no prefix copy: nothing to recompute
        hints.append("--attention split")
        if not recompute_attention:
            hints.append("--recompute-attention")
    if not checkpoint:
        hints.append("--gradient-checkpointing")
    if optimizer in ("adamw", "adamw-sr"):
        hints.append("--optimizer adamw8bit")
    if batch > 1:
        hints.append(f"--batch-size {max(1, batch // 2)} with --grad-accum 2")
    hints.append("--trainable lora")
    raise ValueError(f"estimated peak {est.describe()} exceeds {100 * BUDGET_FRACTION:.0f} % of --gpu-memory-budget "
                     f"{budget / 2**30:.1f} GiB (the rest is the allocator's headroom); try {' or '.join(hints)}")


def count_params(cfg: HeadConfig, trainable: str = "all", lora_rank: int = 16,
                 lora_targets: str = LORA_TARGETS) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the head under a --trainable mode, counted on meta."""
    import torch
    from torch import nn

    from shared.head import AlpamayoHead

    with torch.device("meta"):
        head = AlpamayoHead(cfg)
    n = sum(p.numel() for p in head.parameters())
    proj = sum(p.numel() for m in (head.action_in_proj, head.action_out_proj) for p in m.parameters())
    if trainable == "all":
        return n, n
    if trainable == "projections":
        return n, proj
    targets = {t.strip() for t in lora_targets.split(",") if t.strip()}
    extra = sum(lora_rank * (m.in_features + m.out_features) for name, m in head.expert.named_modules()
                if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    return n + extra, proj + extra


def _attention(train_cfg) -> str:
    """The attention a GPU run of this config uses (the estimate is of GPU memory)."""
    from shared.fast_expert import resolve_attention

    return resolve_attention(train_cfg.attention, "cuda")


def train_estimate(train_cfg, head_cfg: HeadConfig, max_len: int, dtype: str, kv_slots: int) -> MemoryEstimate:
    """The estimate of a head-train config (`max_len` already bucketed): every flag that changes memory."""
    n, n_train = count_params(head_cfg, train_cfg.trainable, train_cfg.lora_rank, train_cfg.lora_targets)
    return estimate(head_cfg, n, n_train, dtype, train_cfg.optimizer, train_cfg.batch_size, max_len,
                    train_cfg.draws, kv_slots=kv_slots, checkpoint=train_cfg.gradient_checkpointing,
                    kv_dtype="int8" if train_cfg.int8_prefix else "bfloat16",
                    recompute_attention=train_cfg.recompute_attention,
                    grads_persist=grads_persist(train_cfg.cuda_graphs or train_cfg.fused_wgrad, train_cfg.grad_accum),
                    trainable=train_cfg.trainable, attention=_attention(train_cfg), compiled=train_cfg.compile)


def check_train_budget(train_cfg, head_cfg: HeadConfig, max_len: int, dtype: str,
                       store_quant: str = "none") -> MemoryEstimate:
    """head-train's check before any model loads: the plan of `train_cfg` against --gpu-memory-budget."""
    from .data import bucket_len
    from .feeder import N_SLOTS

    est = train_estimate(train_cfg, head_cfg, bucket_len(max_len), dtype, kv_slots=N_SLOTS)
    check_budget(est, parse_bytes(train_cfg.gpu_memory_budget), train_cfg.batch_size,
                 train_cfg.gradient_checkpointing, train_cfg.optimizer, train_cfg.recompute_attention,
                 _attention(train_cfg), store_quant == "int8", train_cfg.int8_prefix)
    return est
