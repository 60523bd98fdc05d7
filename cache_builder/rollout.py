"""Rollout prefixes: the VLM writes its chain-of-causation first, as release inference does.

Sampling as the release (top-p 0.98, temperature 0.6, no top-k, at most 256 new tokens, every
`<iN>` trajectory token masked), stopping once every row has produced `<|traj_future_start|>` and one
token more (the release's StopAfterEOS: that extra forward puts `<|traj_future_start|>` itself in the
cache). The expert's prefix is then cut as release inference cuts it: through the first
`<|traj_future_start|>` (or the whole sequence when it never came), and its K/V are the generation's
own cache, as in release inference, with the last-layer hidden states beside them. No second prefill.
The loop is `decode.RolloutDecoder` (a static cache, CUDA-graph steps), held token for token to
transformers `generate` (`reference_generate`), which still runs for attention kernels the decoder
does not drive. A row whose prefix is not wholly in the cache (it ended on the very last step
without `<|traj_future_start|>`) gets prefix=None and is prefilled by the caller.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from shared.prompt import ROLLOUT_SAMPLING, MaskTrajTokens, expert_prefix_len_from_generated, extract_cot
from shared.qwen_files import alpamayo_token_ids

from .decode import Decoded, RolloutDecoder
from .vlm import cache_layers


class AllRowsProduced(StoppingCriteria):
    """Stop when every row has generated `token_id` after the prompt (rows may finish on EOS first)."""

    def __init__(self, token_id: int, prompt_len: int, eos_ids: tuple[int, ...]):
        self.token_id, self.prompt_len, self.eos_ids = token_id, prompt_len, eos_ids

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len:-1]  # the token and then one more, as the release stops
        done = (gen == self.token_id).any(dim=1)
        for e in self.eos_ids:
            done |= (input_ids[:, self.prompt_len:] == e).any(dim=1)
        return done.all().expand(input_ids.shape[0])


@dataclass
class GeneratedPrefix:
    """One row's expert prefix straight from the generation: device views, cut at prefix_len.

    k, v: (layers, kv_heads, L, head_dim); hidden: (L, hidden) or None; rope_delta: 0-d int64."""

    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None
    rope_delta: torch.Tensor


class _CatchFinalNorm:
    """Forward hook on the text model's final norm: its outputs over prefill + decode steps."""

    def __init__(self, module: torch.nn.Module):
        self.outs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(lambda m, a, out: self.outs.append(out))

    def hidden(self) -> torch.Tensor:  # (B, tokens forwarded, hidden)
        self.handle.remove()
        return torch.cat(self.outs, dim=1)


def rollout_seed(base: int, key: str) -> int:
    """Stable per-batch seed from the first sample's key (resumed builds resample identically)."""
    return (base * 1_000_003 + int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")) % 2**63


def make_decoder(vlm, processor) -> RolloutDecoder | None:
    """The static-cache decoder with the release's processors (mask, temperature, top-p: generate's
    order), or None when the VLM's attention kernel is not one it drives (then `generate` runs)."""
    from .decode import SUPPORTED_ATTENTION

    if vlm.config.text_config._attn_implementation not in SUPPORTED_ATTENTION:
        return None
    ids = alpamayo_token_ids(processor.tokenizer)
    procs = LogitsProcessorList([MaskTrajTokens(ids["traj_start"]),
                                 TemperatureLogitsWarper(ROLLOUT_SAMPLING["temperature"]),
                                 TopPLogitsWarper(ROLLOUT_SAMPLING["top_p"], min_tokens_to_keep=1)])
    return RolloutDecoder(vlm, procs, ids["traj_future_start"], ids["im_end"], ids["pad"], _eos_ids(vlm))


def _eos_ids(vlm) -> tuple[int, ...]:
    eos = vlm.generation_config.eos_token_id
    return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@torch.no_grad()
def reference_generate(vlm, processor, batch: dict, seed: int, max_new_tokens: int, keep_hidden: bool) -> Decoded:
    """The release's path, transformers `generate` over its dynamic cache; the decoder is held to it."""
    ids = alpamayo_token_ids(processor.tokenizer)
    prompt_len = batch["input_ids"].shape[1]
    torch.manual_seed(seed)
    sampling = {k: v for k, v in ROLLOUT_SAMPLING.items() if k != "max_new_tokens"}
    catch = _CatchFinalNorm(vlm.model.language_model.norm) if keep_hidden else None
    try:
        gen = vlm.generate(
            **batch, **sampling, max_new_tokens=max_new_tokens, pad_token_id=ids["pad"], return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([MaskTrajTokens(ids["traj_start"])]),
            stopping_criteria=StoppingCriteriaList([AllRowsProduced(ids["traj_future_start"], prompt_len,
                                                                    (ids["im_end"],))]),
        )
    finally:
        hidden = catch.hidden() if catch is not None else None  # (B, forwarded, H)
    layers = cache_layers(gen.past_key_values)
    keys_, values_ = torch.stack([k for k, _ in layers]), torch.stack([v for _, v in layers])  # (layers, B, h, T, D)
    deltas = getattr(vlm.model, "rope_deltas", None)
    in_cache = keys_.shape[3]  # tokens forwarded: the last sampled token never is
    B = batch["input_ids"].shape[0]
    if (hidden is not None and hidden.shape[1] != in_cache) or deltas is None or deltas.numel() != B:
        in_cache = 0  # a transformers version that forwards otherwise -> every row is prefilled by the caller
        deltas = torch.zeros(B, dtype=torch.long)
    deltas = deltas.reshape(-1).to(device=vlm.device, dtype=torch.long)
    return Decoded(gen.sequences.cpu(), keys_, values_, hidden, deltas, in_cache)


@torch.no_grad()
def generate_prefixes(vlm, processor, keys: list[str], inputs: list[dict], seed: int,
                      max_new_tokens: int = ROLLOUT_SAMPLING["max_new_tokens"], keep_hidden: bool = True,
                      decoder: RolloutDecoder | None = None) -> list[tuple[dict, str, GeneratedPrefix | None]]:
    """Batched rollout over same-length prompts -> per sample (prefix inputs with prefix_len, CoC text,
    the prefix's K/V/hidden from the generation or None). `decoder` (make_decoder) or, without one,
    transformers `generate`."""
    ids = alpamayo_token_ids(processor.tokenizer)
    device = vlm.device
    batch = {k: torch.cat([x[k] for x in inputs]).to(device)
             for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    batch["pixel_values"] = torch.cat([x["pixel_values"] for x in inputs]).to(device, vlm.dtype)
    prompt_len = batch["input_ids"].shape[1]
    s = rollout_seed(seed, keys[0])
    dec = (decoder(batch, max_new_tokens, keep_hidden, s) if decoder is not None
           else reference_generate(vlm, processor, batch, s, max_new_tokens, keep_hidden))
    out = []
    for b, x in enumerate(inputs):
        seq = dec.sequences[b]
        if not (seq[prompt_len:] == ids["traj_future_start"]).any():  # never came: drop batch padding first
            keep = (seq != ids["pad"]).nonzero().flatten()
            seq = seq[: int(keep[-1]) + 1]
        L = expert_prefix_len_from_generated(seq, ids["traj_future_start"])
        text = processor.tokenizer.decode(seq[prompt_len:L], skip_special_tokens=False)
        gen_types = torch.zeros(L - prompt_len, dtype=torch.long)
        y = dict(x)
        y["input_ids"] = seq[None, :L].clone()
        y["attention_mask"] = torch.ones_like(y["input_ids"])
        y["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"][0], gen_types])[None]
        y["prefix_len"] = L
        prefix = None
        if L <= dec.in_cache:  # copies: the decoder's buffers are reused by the next batch
            prefix = GeneratedPrefix(dec.keys[:, b, :, :L].clone(), dec.values[:, b, :, :L].clone(),
                                     None if dec.hidden is None else dec.hidden[b, :L].clone(),
                                     dec.rope_deltas[b].clone())
        out.append((y, extract_cot("<|cot_start|>" + text), prefix))
    return out
