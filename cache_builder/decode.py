"""Rollout decoding over a static KV cache, one CUDA graph per batch shape.

Release inference samples the chain-of-causation with transformers' `generate`. At 8 rows that decode
is launch-bound on an H200 (tens of ms a token for a few ms of GPU work). This loop takes the same
steps: the prompt prefilled by the VLM, then per token the VLM's own decoder layers, the same
logits processors (the caller's `<iN>` mask, temperature, top-p, in generate's order), the same
draw as `torch.multinomial` (its one-sample path: exponential race, argmax), generate's per-row EOS
padding and the release's stop one token after every row's `<|traj_future_start|>`. What changes is
where the cache lives: preallocated (layers, B, kv_heads, T, head_dim) buffers written at a device-side
position, a boolean mask over them, so every step is the same kernels on the same addresses. On CUDA
one step is captured once and replayed; elsewhere it runs eagerly, and that is the path the tests
hold against `generate` token for token.

Single-token attention goes through `grouped_decode_attention`: the query heads that share a KV head
ride as a short query of that head, so the cache is never repeated per query head (transformers'
sdpa path copies K/V 4x when a mask is given).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LogitsProcessorList

from .vlm import prefill

DECODE_ATTENTION = "alpamayo_grouped_decode"
SUPPORTED_ATTENTION = ("sdpa", "eager")


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, Hq, 1, D) against key/value (B, Hkv, T, D) with a boolean mask (B, 1, 1, T).

    Query head h uses KV head h // (Hq / Hkv), as transformers' repeat_kv pairs them. -> ((B, 1, Hq, D), None)."""
    B, Hq, q_len, D = query.shape
    Hkv = key.shape[1]
    if q_len != 1:
        raise ValueError(f"grouped_decode_attention takes one query token per row, got {q_len}")
    q = query.reshape(B, Hkv, Hq // Hkv, D)  # (B, Hkv, groups, D): the groups share their KV head
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)


class StaticKV:
    """The decode's KV cache, duck-typed as a transformers cache for the decoder layers.

    k, v: (layers, B, kv_heads, T, head_dim). `update` writes the step's token at `pos` (a 1-element
    device tensor) and hands the layer the whole buffer; the step's mask hides what lies past `pos`."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        self.k = torch.zeros(layers, batch, heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # (B, heads, 1, D) each
        self.k[layer_idx].index_copy_(2, self.pos, key_states)
        self.v[layer_idx].index_copy_(2, self.pos, value_states)
        return self.k[layer_idx], self.v[layer_idx]


class _State:
    """Every tensor one decode step reads or writes, at fixed addresses (a captured step replays on them)."""

    def __init__(self, vlm, batch: int, length: int, max_new: int, keep_hidden: bool, pad: int):
        tc = vlm.config.text_config
        dev, dt = vlm.device, vlm.dtype
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.kv = StaticKV(tc.num_hidden_layers, batch, tc.num_key_value_heads, length, head_dim, dt, dev)
        self.hidden = torch.zeros(batch, length, tc.hidden_size, dtype=dt, device=dev) if keep_hidden else None
        self.positions = torch.arange(length, device=dev)  # (T,)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # the token this step forwards
        self.delta = torch.zeros(batch, dtype=torch.long, device=dev)  # M-RoPE rope_deltas of the prompt
        self.n = torch.zeros(1, dtype=torch.long, device=dev)  # tokens sampled so far
        self.gen = torch.full((batch, max_new), pad, dtype=torch.long, device=dev)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=dev)  # generate's per-row EOS state
        self.fs_before = torch.zeros(batch, dtype=torch.bool, device=dev)  # <|traj_future_start|> before the newest
        self.im_end = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.stop = torch.zeros(1, dtype=torch.bool, device=dev)
        self.pad = pad

    def reset(self, pf) -> None:
        """Load one prefilled batch (keys/values (layers, B, h, P, D), hidden (B, P, H)) in place; the
        next forward is at position P."""
        P = pf.keys.shape[3]
        self.kv.k[:, :, :, :P].copy_(pf.keys)
        self.kv.v[:, :, :, :P].copy_(pf.values)
        if self.hidden is not None:
            self.hidden[:, :P].copy_(pf.hidden)
        self.kv.pos.fill_(P)
        self.delta.copy_(pf.rope_deltas)
        self.n.zero_()
        self.gen.fill_(self.pad)
        self.unfinished.fill_(True)
        self.fs_before.zero_()
        self.im_end.zero_()
        self.stop.zero_()


@dataclass
class Decoded:
    """One batch's rollout.

    sequences: (B, P + n) on the host (prompt, then the n sampled tokens, EOS-padded per row);
    keys/values: (layers, B, kv_heads, >= in_cache, head_dim) and hidden (B, >= in_cache, H) or None on
    the device, valid for the first `in_cache` = P + n - 1 tokens (the last sampled one is never
    forwarded); rope_deltas: (B,) int64 on the device. Those four are the decoder's own buffers: its
    next call overwrites them, so copy what you keep."""

    sequences: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    hidden: torch.Tensor | None
    rope_deltas: torch.Tensor
    in_cache: int


class RolloutDecoder:
    """generate's sampling loop over a static cache; keeps the last captured step for reuse.

    processors: applied to each step's fp32 logits (B, vocab) as generate applies them; they see the
    scores only (input_ids=None), which is all the release's processors read. Under CUDA graphs they are
    captured, so they must be tensor functions of the scores (Python state runs only at capture, whose
    warm-up step calls them once).
    stop_token: the release's StopAfterEOS token (`<|traj_future_start|>`); im_end: the EOS that rule
    also accepts; eos: generate's per-row EOS ids (the VLM's generation config)."""

    def __init__(self, vlm, processors: LogitsProcessorList, stop_token: int, im_end: int, pad: int,
                 eos: tuple[int, ...], graphs: bool | None = None, length_step: int = 128):
        impl = vlm.config.text_config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"rollout decoding supports attention {SUPPORTED_ATTENTION}, the VLM was loaded with {impl!r}")
        self.vlm, self.processors = vlm, processors
        self.stop_token, self.im_end, self.pad = stop_token, im_end, pad
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long, device=vlm.device)
        self.graphs = vlm.device.type == "cuda" if graphs is None else graphs
        self.length_step = length_step
        layer = vlm.model.language_model.layers[0]
        params = inspect.signature(layer.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 renamed it
        self._state: _State | None = None
        self._key: tuple | None = None
        self._graph = None

    # ---------------------------------------------------------------- one step
    def _pick(self, st: _State, logits: torch.Tensor) -> None:
        """Sample from fp32 logits (B, vocab) and do generate's bookkeeping, all on the device."""
        scores = self.processors(None, logits)
        probs = scores.softmax(dim=-1)
        nxt = probs.div_(torch.empty_like(probs).exponential_(1)).argmax(dim=-1)  # = multinomial(probs, 1)
        nxt = torch.where(st.unfinished, nxt, self.pad)
        st.gen.index_copy_(1, st.n, nxt[:, None])
        st.n.add_(1)
        st.im_end |= nxt == self.im_end
        every_row = (st.fs_before | st.im_end).all()  # StopAfterEOS: one token after the last row's
        st.unfinished &= ~torch.isin(nxt, self.eos)
        st.stop.copy_((every_row | ~st.unfinished.any()).reshape(1))
        st.fs_before |= nxt == self.stop_token
        st.tok.copy_(nxt[:, None])

    @contextlib.contextmanager
    def _grouped_attention(self):
        tc = self.vlm.config.text_config
        before = tc._attn_implementation
        tc._attn_implementation = DECODE_ATTENTION
        try:
            yield
        finally:
            tc._attn_implementation = before

    def _step(self, st: _State) -> None:
        """Forward st.tok at cache position st.kv.pos through the VLM's text model, then sample."""
        lm = self.vlm.model.language_model
        B = st.tok.shape[0]
        x = lm.embed_tokens(st.tok)  # (B, 1, H)
        pos = (st.kv.pos + st.delta).view(1, B, 1).expand(3, B, 1)  # a text token: one position on 3 axes
        rope = lm.rotary_emb(x, pos)
        mask = (st.positions <= st.kv.pos).view(1, 1, 1, -1).expand(B, 1, 1, -1)  # (B, 1, 1, T) bool
        with self._grouped_attention():
            for layer in lm.layers:
                x = layer(x, position_embeddings=rope, attention_mask=mask, **{self._cache_kw: st.kv})
                x = x[0] if isinstance(x, tuple) else x
        h = lm.norm(x)  # (B, 1, H)
        if st.hidden is not None:
            st.hidden.index_copy_(1, st.kv.pos, h)
        self._pick(st, self.vlm.lm_head(h)[:, -1].float())
        st.kv.pos.add_(1)

    def _prepared(self, B: int, P: int, max_new: int, keep_hidden: bool) -> _State:
        T = -(-(P + max_new) // self.length_step) * self.length_step
        key = (B, T, max_new, keep_hidden)
        if key != self._key:  # one shape kept: a new one frees the old buffers and graph first
            self._state = self._graph = None
            self._state = _State(self.vlm, B, T, max_new, keep_hidden, self.pad)
            self._key = key
        return self._state

    def _replay(self, st: _State):
        if not self.graphs:
            return lambda: self._step(st)
        if self._graph is None:
            side = torch.cuda.Stream(self.vlm.device)
            side.wait_stream(torch.cuda.current_stream(self.vlm.device))
            with torch.cuda.stream(side):  # warm-up outside the capture: lazy inits, library workspaces
                self._step(st)
            torch.cuda.current_stream(self.vlm.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"):  # the writer's threads go on
                self._step(st)
            self._graph = g
        return self._graph.replay

    # ---------------------------------------------------------------- a batch
    @torch.no_grad()
    def __call__(self, batch: dict, max_new_tokens: int, keep_hidden: bool, seed: int) -> Decoded:
        """batch: same-length prompts (B, P) with their pixels -> Decoded. Seeded after the prefill
        (which draws nothing), so the draws equal generate's under torch.manual_seed(seed)."""
        B, P = batch["input_ids"].shape
        st = self._prepared(B, P, max_new_tokens, keep_hidden)
        step = self._replay(st)  # captures on first use (its warm-up step runs on stale state)
        pf = prefill(self.vlm, batch, P, keep_hidden=True)
        logits = self.vlm.lm_head(pf.hidden[:, -1:])[:, -1].float()  # (B, vocab), as generate's first step
        st.reset(pf)
        del pf
        torch.manual_seed(seed)
        self._pick(st, logits)
        n = 1
        while n < max_new_tokens and not bool(st.stop):
            step()
            n += 1
        seqs = torch.cat([batch["input_ids"].cpu(), st.gen[:, :n].cpu()], dim=1)
        return Decoded(seqs, st.kv.k, st.kv.v, st.hidden, st.delta, P + n - 1)
