"""How many bytes and files a sample takes, before building (cache-build --dry-run)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared import kv_quant
from shared.store.format import TRAJ_SIZE, KVSpec, _hidden_tokens_per_chunk, _kv_layers_per_chunk

# Measured lossless ratios (kv-storage.md §3.2/3.3 on bf16; bench/bench_store_io.py here).
_RATIO = {
    ("bfloat16", "none", "zstd"): 1.26, ("bfloat16", "none", "blosc-lz4"): 1.20,
    ("float32", "none", "zstd"): 1.10, ("float32", "none", "blosc-lz4"): 1.10,
    ("bfloat16", "int8", "zstd"): 1.08, ("float32", "int8", "zstd"): 1.08,
    ("bfloat16", "int4", "zstd"): 1.02, ("float32", "int4", "zstd"): 1.02,
}


@dataclass(frozen=True)
class SizeEstimate:
    logical_bytes: int  # KV in kv dtype + hidden + small arrays, uncompressed
    kv_logical_bytes: int  # K+V alone in kv dtype
    stored_bytes: int  # estimate after quantisation and the lossless codec
    files: int  # objects per sample (metadata + chunks + manifest)


def estimate_sample_bytes(spec: KVSpec, prefix_len: int, n_cam: int = 4, reasoning_chars: int = 0) -> SizeEstimate:
    """Bytes one sample of `prefix_len` tokens takes (for cache-build --dry-run)."""
    L = int(prefix_len)
    if L <= 0:
        raise ValueError(f"prefix_len must be > 0, got {prefix_len}")
    kv_logical = 2 * spec.num_layers * spec.num_kv_heads * L * spec.head_dim * spec.itemsize
    hidden = L * spec.hidden_size * spec.itemsize if spec.store_hidden else 0
    small = L * 8 + n_cam * spec.thumb_hw[0] * spec.thumb_hw[1] * 3 + TRAJ_SIZE * 8
    manifest = 2000 + reasoning_chars
    if spec.quant == "none":
        kv_stored = kv_logical
    else:
        shape = kv_quant.code_shape(spec.quant, spec.num_layers, spec.num_kv_heads, L, spec.head_dim)
        kv_stored = math.prod(shape)
    ratio = 1.0 if spec.codec == "none" else _RATIO.get((spec.kv_dtype, spec.quant, spec.codec), 1.05)
    params = sum(
        math.prod(s) * np.dtype(dt).itemsize
        for s, dt in kv_quant.param_shapes(spec.quant, spec.num_layers, spec.num_kv_heads, L, spec.head_dim).values()
    )
    h_ratio = 1.0 if spec.codec == "none" else _RATIO.get((spec.kv_dtype, "none", spec.codec), 1.05)
    stored = int(kv_stored / ratio + params + hidden / h_ratio + small / 2 + manifest)
    n_kv_chunks = 1 if spec.shard else spec.num_layers // _kv_layers_per_chunk(spec, L)
    n_h_chunks = 0 if not spec.store_hidden else (1 if spec.shard else -(-L // _hidden_tokens_per_chunk(spec, L)))
    n_arrays = 4 + len(kv_quant.param_shapes(spec.quant, 1, 1, 1, spec.head_dim)) + int(spec.store_hidden)
    files = 1 + n_arrays * 2 - 2 - int(spec.store_hidden) + n_kv_chunks + n_h_chunks + 1
    return SizeEstimate(kv_logical + hidden + small, kv_logical, stored, files)
