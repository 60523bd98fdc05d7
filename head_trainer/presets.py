"""Named starting points for `head-train --preset NAME`; flags given on the command line win.

The 24gb and 80gb values are the plans measured in docs/TRAINING.md (one place to change them).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # tiny checkpoint on the CPU: the whole loop (validation, EMA, best-k, resume) in seconds
    "debug": {"device": "cpu", "dtype": "float32", "steps": 20, "batch_size": 2, "warmup_steps": 2,
              "val_every": 10, "val_max_items": 8, "val_ade_items": 2, "save_every": 10, "log_every": 1,
              "ema_decay": 0.9, "num_workers": 0},
    # full expert + projections on a 24 GiB card: bf16 weights, 8-bit states with stochastic rounding (the
    # Triton update), the default --attention auto (split on CUDA: B = 8, L = 2,993 step 57.5 ms against 68.5
    # with SDPA on an H100, same call, fast-math update; peak 18.3 GiB), layer recompute, which two slots of
    # 4-camera prefixes need under the budget's 90 % (docs/TRAINING.md; front-only: --no-gradient-checkpointing)
    "24gb": {"trainable": "all", "dtype": "bfloat16", "optimizer": "adamw8bit-fused", "batch_size": 8, "grad_accum": 1,
             "gradient_checkpointing": True, "gpu_memory_budget": "24GiB"},
    # full expert + projections on an 80 GB card: AdamW states in bf16 with stochastic rounding, no recompute
    # (its B = 1 / 4 peaks were measured under 24 GiB: 17.5 / 18.8 GiB; B = 8 not yet on a bigger card)
    "80gb": {"trainable": "all", "dtype": "bfloat16", "optimizer": "adamw-sr", "batch_size": 8, "grad_accum": 1,
             "gradient_checkpointing": False, "gpu_memory_budget": "80GB"},
}


def apply_preset(values: dict, explicit: set[str]) -> dict:
    """`values` (field -> value) with the preset's fields filled in where the user gave no flag."""
    name = values.get("preset")
    if name is None:
        return values
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: use one of {', '.join(PRESETS)}")
    return {**values, **{k: v for k, v in PRESETS[name].items() if k not in explicit}}
