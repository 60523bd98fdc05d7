"""Rollout prefixes: the VLM writes its chain-of-causation first, as release inference does.

Sampling as the release (top-p 0.98, temperature 0.6, no top-k, at most 256 new tokens, every
`<iN>` trajectory token masked), stopping once every row has produced `<|traj_future_start|>`.
The expert's prefix is then cut as release inference cuts it: through the first
`<|traj_future_start|>` (or the whole sequence when it never came). We re-run the prefill over that
exact prefix to get its KV, which equals the generation cache up to incremental-decode rounding.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from shared.prompt import ROLLOUT_SAMPLING, MaskTrajTokens, expert_prefix_len_from_generated, extract_cot
from shared.qwen_files import alpamayo_token_ids


class AllRowsProduced(StoppingCriteria):
    """Stop when every row has generated `token_id` after the prompt (rows may finish on EOS first)."""

    def __init__(self, token_id: int, prompt_len: int, eos_ids: tuple[int, ...]):
        self.token_id, self.prompt_len, self.eos_ids = token_id, prompt_len, eos_ids

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len:]
        done = (gen == self.token_id).any(dim=1)
        for e in self.eos_ids:
            done |= (gen == e).any(dim=1)
        return done.all().expand(input_ids.shape[0])


def rollout_seed(base: int, key: str) -> int:
    """Stable per-batch seed from the first sample's key (resumed builds resample identically)."""
    return (base * 1_000_003 + int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")) % 2**63


@torch.no_grad()
def generate_prefixes(vlm, processor, keys: list[str], inputs: list[dict], seed: int,
                      max_new_tokens: int = ROLLOUT_SAMPLING["max_new_tokens"]) -> list[tuple[dict, str]]:
    """Batched rollout over same-length prompts -> per sample (prefix inputs with prefix_len, CoC text)."""
    ids = alpamayo_token_ids(processor.tokenizer)
    device = vlm.device
    batch = {k: torch.cat([x[k] for x in inputs]).to(device)
             for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    batch["pixel_values"] = torch.cat([x["pixel_values"] for x in inputs]).to(device, vlm.dtype)
    prompt_len = batch["input_ids"].shape[1]
    torch.manual_seed(rollout_seed(seed, keys[0]))
    sampling = {k: v for k, v in ROLLOUT_SAMPLING.items() if k != "max_new_tokens"}
    seqs = vlm.generate(
        **batch, **sampling, max_new_tokens=max_new_tokens, pad_token_id=ids["pad"],
        logits_processor=LogitsProcessorList([MaskTrajTokens(ids["traj_start"])]),
        stopping_criteria=StoppingCriteriaList([AllRowsProduced(ids["traj_future_start"], prompt_len, (ids["im_end"],))]),
    ).cpu()  # (B, prompt + generated)
    out = []
    for b, x in enumerate(inputs):
        seq = seqs[b]
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
        out.append((y, extract_cot("<|cot_start|>" + text)))
    return out
