"""The expert's attention over a cached prefix at release shapes (GPU): SDPA over [prefix; action] copies
against the split attention (shared/prefix_attention.py + the action block), and the kernels' tiles.

    python bench/bench_prefix_attention.py --check                 # the interpreter checks, on CUDA
    python bench/bench_prefix_attention.py --json $OUT/prefix_attention.json

One layer's attention core (B = 8, 8 KV heads x 2 query heads x 64 action tokens, head_dim 128, bf16)
as the step runs it (torch.compile'd, graph-replayed, CUDA-event median): forward alone, and forward +
backward to q / k / v (what the step needs); SDPA with and without the attention recompute. Errors are
against the same attention in fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shared.prefix_attention as pa  # noqa: E402
from shared.fast_expert import _attention, _attention_split  # noqa: E402
from shared.kv_quant import dequantize_int8_prefix, int8_prefix  # noqa: E402

B, H, G, T, D = 8, 8, 2, 64, 128
DEV = "cuda"  # --device cpu: a smoke run of this script (tiny L, no graphs, perf_counter times)
# (CHUNK, BLOCK_M, BLOCK_N, warps, stages): the default first
# (3,072: at L = 2,993 one chunk per program, so the kernels write the outputs and nothing merges; 8 warps: ptxas
# fits a 64 x 64 tile without spilling, where 4 warps spill at 255 registers: docs/kernel_resources_sm90.json and
# bench/compile_kernels_sm90.py. The first two also run at the other lengths)
TILES = [(512, 64, 64, 4, 2), (3072, 64, 64, 4, 2), (512, 64, 64, 8, 2), (3072, 64, 64, 8, 2), (1024, 64, 64, 4, 2),
         (1536, 64, 64, 4, 2), (256, 64, 64, 4, 2), (128, 64, 64, 4, 2), (256, 128, 64, 8, 2), (3072, 64, 64, 4, 3),
         (3072, 128, 64, 8, 2), (512, 128, 64, 8, 3), (256, 64, 32, 4, 2), (256, 64, 64, 4, 3)]


def inputs(L: int, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    lmax = -(-L // 64) * 64  # the loader's bucket
    q = torch.randn(B, H, G * T, D, device=DEV, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, T, D, device=DEV, generator=g, dtype=dtype) for _ in range(2))
    kp, vp = (torch.randn(B, H, lmax, D, device=DEV, generator=g, dtype=dtype) for _ in range(2))
    lengths = torch.full((B,), L, device=DEV)
    lengths[1::2] = max(1, L - 200)  # padding in every other sample
    keep = torch.arange(lmax, device=DEV).view(1, -1) < lengths.view(-1, 1)
    mask = torch.zeros(B, 1, G * T, lmax + T, device=DEV, dtype=dtype)
    mask[..., :lmax].masked_fill_(~keep.view(B, 1, 1, lmax), torch.finfo(dtype).min)
    go = torch.randn(B, H, G * T, D, device=DEV, generator=g, dtype=dtype)
    return q, k, v, kp, vp, lengths, mask, go


_MADE: dict = {}


def make(kind: str, L: int, backward: bool):
    """fwd (+ bwd) of one path on fixed inputs; compiled once per (path, L), so a tile sweep only re-captures
    (the op reads its tile constants at launch)."""
    if (kind, L) not in _MADE:
        q, k, v, kp, vp, lengths, mask, go = inputs(L)
        scale = D ** -0.5
        if kind == "split":
            f = torch.compile(lambda a, b, c: _attention_split(a, b, c, kp, vp, lengths, mask[..., -T:], scale))
        elif kind == "split_int8":  # --int8-prefix: the codes read in place (half the bytes of the bf16 prefix)
            kc, vc, ks, vs = int8_prefix(kp, vp)
            f = torch.compile(lambda a, b, c: _attention_split(a, b, c, kc, vc, lengths, mask[..., -T:], scale, ks, vs))
        elif kind == "sdpa":
            f = torch.compile(lambda a, b, c: _attention(a, b, c, kp, vp, mask, scale))
        else:  # sdpa with the attention recompute (decoder_layer's recompute_attention)
            def f(a, b, c):
                return torch.utils.checkpoint.checkpoint(_attention, a, b, c, kp, vp, mask, scale, use_reentrant=False)
        _MADE[kind, L] = (f, [x.requires_grad_() for x in (q, k, v)], go)
    f, leaves, go = _MADE[kind, L]

    def run():
        o = f(*leaves)
        if backward:
            return torch.autograd.grad(o, leaves, go)
        return o
    return run


def graph_ms(run, n: int = 20) -> float:
    if DEV == "cpu":
        import time

        run()
        t0 = time.perf_counter()
        run()
        return round(1e3 * (time.perf_counter() - t0), 4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        run()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return round(statistics.median(times), 4)


def errors(L: int) -> dict:
    """Max |error| of the output and of dq / dk / dv against the fp32 computation, per path."""
    q, k, v, kp, vp, lengths, mask, go = inputs(L, seed=1)
    scale = D ** -0.5

    def grads(fn, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, kp.to(dtype), vp.to(dtype), dtype)
        return [o.detach().float(), *(x.float() for x in torch.autograd.grad(o, leaves, go.to(dtype)))]

    def split(a, b, c, kp_, vp_, dtype):
        return _attention_split(a, b, c, kp_, vp_, lengths, mask[..., -T:].to(dtype), scale)

    def sdpa(a, b, c, kp_, vp_, dtype):
        return _attention(a, b, c, kp_, vp_, mask.to(dtype), scale)

    def err(got, ref):
        return {k: float((a - r).abs().max()) for k, a, r in zip(("o", "dq", "dk", "dv"), got, ref)}

    ref = grads(sdpa, torch.float32)
    out = {}
    for name, fn in (("split", split), ("sdpa", sdpa)):
        out[name] = err(grads(fn, torch.bfloat16), ref)
    out["split_fp32"] = err(grads(split, torch.float32), ref)
    # --int8-prefix against the same attention in fp32 over the dequantised prefix (the kernels' arithmetic,
    # not the quantisation), beside today's path: the prefix dequantised to bf16, then split
    kc, vc, ks, vs = int8_prefix(kp, vp)
    kd, vd = dequantize_int8_prefix(kc, vc, ks, vs, torch.float32)

    def split_int8(a, b, c, kp_, vp_, dtype):
        return _attention_split(a, b, c, kc, vc, lengths, mask[..., -T:].to(dtype), scale, ks, vs)

    def sdpa_deq(a, b, c, kp_, vp_, dtype):
        return _attention(a, b, c, kd, vd, mask.to(torch.float32), scale)

    def split_deq(a, b, c, kp_, vp_, dtype):
        return _attention_split(a, b, c, kd.to(dtype), vd.to(dtype), lengths, mask[..., -T:].to(dtype), scale)

    ref_deq = grads(sdpa_deq, torch.float32)
    out["split_int8"] = err(grads(split_int8, torch.bfloat16), ref_deq)
    out["split_dequant_bf16"] = err(grads(split_deq, torch.bfloat16), ref_deq)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--lengths", default="2993,809")
    ap.add_argument("--tiles", type=int, default=len(TILES), help="how many of TILES to sweep at the first length")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if args.check:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import prefix_attention_check as c

        c.run_checks("cuda")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []

    def save(rec):
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        if args.json:
            name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
            Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                   "rows": rows}, indent=1) + "\n")

    default = (pa.CHUNK, pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES)
    for i, L in enumerate(int(x) for x in args.lengths.split(",")):
        for kind in ("sdpa", "sdpa_recompute", "split", "split_int8"):
            n_tiles = (args.tiles if kind == "split" else min(args.tiles, 3)) if i == 0 else min(args.tiles, 2)
            for tile in (TILES[:n_tiles] if kind.startswith("split") else [default]):
                pa.CHUNK, pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES = tile
                rec = {"L": L, "B": B, "path": kind, **({"tile": list(tile)} if kind.startswith("split") else {})}
                try:
                    if kind != "sdpa_recompute":
                        rec["fwd_ms"] = graph_ms(make(kind, L, False))
                    rec["fwd_bwd_ms"] = graph_ms(make(kind, L, True))
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a row, not the end
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    traceback.print_exc()
                save(rec)
        pa.CHUNK, pa.BLOCK_M, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES = default
        save({"L": L, "B": B, "path": "errors vs fp32", **errors(L)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
