"""GPU time of one optimizer step over 24 release-like bf16 tensors (214 M elements), launched eagerly:
torchao AdamW8bit against adamw8bit-fused compiled with automatic dynamic shapes, with one static compile
per shape, uncompiled, and as the Triton kernel (head_trainer/adam8_triton.py) for a few (blocks per
program, warps) choices, each also replayed from a CUDA graph (no host time: what head-train's
--cuda-graphs step sees) with the bandwidth that implies at 10 bytes per element.

    python bench/diag_adam8.py            # on the GPU box (PYTHONPATH with torchao)
    python bench/diag_adam8.py --check    # first: the kernel against the eager torch update on CUDA
    python bench/diag_adam8.py --ablate [--json PATH]  # where the kernel's time goes (graph-replayed)

--ablate times the kernel with parts switched off (adam8_triton.DIAG: wrong numbers, timing only) beside a
copy kernel that moves the same 10 bytes per element: the gap between the two is the kernel's compute and
table lookups, and each ablation says which part of that gap is whose.

Eager launches include the host's per-parameter overhead, which dominates torchao here (its tensor
subclass dispatch); the CUDA-graph replay in bench/profile_head_step.py is the figure without it.
Measured 2026-12-07 on H100s (docs/PERFORMANCE.md, "Head training on an H100"): run 1, ms per step /
warm-up s: torchao 17.02 / 24.1; inductor automatic-dynamic 13.17 / 10.6; static 9.53 / 13.0; eager 131.83;
run 2 (docs/bench_adam8_update_h100.json): the Triton kernel 2.46 ms graph-replayed (1 block x 2 warps),
torchao 20.29 ms eager.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from head_trainer import adam8  # noqa: E402

SHAPES = [(2048, 6144), (6144, 2048), (4096, 2048), (1024, 2048)] * 6


def bench(make, n: int = 5, graph: bool = False) -> tuple[float, float]:
    """(ms per step over n steps after 3 warm-up steps, warm-up seconds); graph: replays of one captured step."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16)) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = make(ps)
    t0 = time.time()
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    warm = time.time() - t0
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            opt.step()
        step = g.replay
    else:
        step = opt.step
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        step()
    b.record()
    b.synchronize()
    return round(a.elapsed_time(b) / n, 2), round(warm, 1)


def fused_with(compile_kw: dict | None):
    """adamw8bit-fused with torch.compile given `compile_kw` (None: not compiled)."""
    def make(ps):
        orig = torch.compile
        adam8.torch.compile = (lambda f, **kw: orig(f, **{**kw, **compile_kw})) if compile_kw is not None else (lambda f, **kw: f)
        try:
            return adam8.AdamW8bitFused(ps, lr=1e-4, backend="compile")
        finally:
            adam8.torch.compile = orig
    return make


def roofline_with(block: int, warps: int):
    """A kernel that reads and writes what the update does (bf16 weight + gradient, two uint8 codes, two
    block scales) with one add per element: the bandwidth this GPU gives this access pattern."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy10(p_ptr, g_ptr, mc_ptr, vc_ptr, ms_ptr, vs_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        p = tl.load(p_ptr + offs).to(tl.float32) + tl.load(g_ptr + offs).to(tl.float32)
        tl.store(p_ptr + offs, p.to(tl.bfloat16))
        tl.store(mc_ptr + offs, tl.load(mc_ptr + offs) + 1)
        tl.store(vc_ptr + offs, tl.load(vc_ptr + offs) + 1)
        b = tl.program_id(0) * (BLOCK // 256) + tl.arange(0, BLOCK // 256)
        tl.store(ms_ptr + b, tl.load(ms_ptr + b) * 0.5)
        tl.store(vs_ptr + b, tl.load(vs_ptr + b) * 0.5)

    class Copy:
        def __init__(self, ps):
            self.ps = ps
            self.st = [(torch.zeros(p.numel(), dtype=torch.uint8, device="cuda"),
                        torch.zeros(p.numel(), dtype=torch.uint8, device="cuda"),
                        torch.ones(p.numel() // 256, device="cuda"), torch.ones(p.numel() // 256, device="cuda"))
                       for p in ps]

        def step(self):
            for p, (mc, vc, ms, vs) in zip(self.ps, self.st):
                copy10[(p.numel() // block,)](p, p.grad, mc, vc, ms, vs, BLOCK=block, num_warps=warps)
    return Copy


def triton_with(rows: int, warps: int, search: int = 1, fast: int = 0, diag: int = 0):
    """adamw8bit-fused's Triton kernel with `rows` 256-element blocks per program, `warps` warps, code
    search `search` (0: binary search in the map, 1: arithmetic guess + bounds, 2: table guess + bounds),
    and `fast` (1: reciprocals and approximate division / square root instead of torchao's IEEE ones)."""
    from head_trainer import adam8_triton

    def make(ps):
        adam8_triton.ROWS, adam8_triton.NUM_WARPS, adam8_triton.SEARCH, adam8_triton.FAST = rows, warps, search, fast
        adam8_triton.DIAG = diag
        return adam8.AdamW8bitFused(ps, lr=1e-4, backend="triton")
    return make


def check() -> None:
    """tests/adam8_interpreter_check.py's checks with the kernel compiled for CUDA, on CUDA tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import adam8_interpreter_check as c

    c.run_checks("cuda")


def ablate() -> None:
    """Graph-replayed ms of the kernel with parts switched off, beside the 10-byte copy (see the docstring)."""
    elems = sum(a * b for a, b in SHAPES)
    rows = [("copy of the same bytes, 256 x 2 warps", roofline_with(256, 2)),
            ("copy of the same bytes, 1024 x 4 warps", roofline_with(1024, 4)),
            ("search 1, 1 x 2 warps (run 5's kernel)", triton_with(1, 2)),
            ("table guess (SEARCH 2), 1 x 2 warps", triton_with(1, 2, search=2)),
            ("table guess, 1 x 1 warp (shipped since run 6)", triton_with(1, 1, search=2)),
            ("table guess, 2 x 2 warps", triton_with(2, 2, search=2)),
            ("table guess, fast math, 1 x 2 warps", triton_with(1, 2, search=2, fast=1)),
            ("table guess, fast math, 1 x 1 warp", triton_with(1, 1, search=2, fast=1)),
            ("table guess, fast math, 2 x 2 warps", triton_with(2, 2, search=2, fast=1)),
            ("no dequantisation gathers", triton_with(1, 2, diag=1)),
            ("no encoding bounds gathers", triton_with(1, 2, diag=2)),
            ("no stochastic rounding", triton_with(1, 2, diag=4)),
            ("no gathers at all", triton_with(1, 2, diag=3)),
            ("no gathers, no rounding", triton_with(1, 2, diag=7)),
            ("no code search (linear codes)", triton_with(1, 2, diag=8)),
            ("no block absmax", triton_with(1, 2, diag=16)),
            ("no search, no absmax, no gathers, no rounding", triton_with(1, 2, diag=31)),
            ("fast math", triton_with(1, 2, fast=1)),
            ("fast math, no gathers, no rounding", triton_with(1, 2, fast=1, diag=7)),
            ("kernel as shipped, 1 x 1 warp", triton_with(1, 1)),
            ("fast math, 2 x 2 warps", triton_with(2, 2, fast=1))]
    out = []
    print("| variant | graph-replayed ms | GB/s at 10 B / element |\n| --- | --- | --- |")
    for name, make in rows:
        try:
            ms = bench(make, 20, graph=True)[0]
        except Exception as exc:  # noqa: BLE001 - report and go on
            ms = f"{type(exc).__name__}: {str(exc)[:80]}"
        bw = round(10 * elems / (ms * 1e-3) / 1e9) if isinstance(ms, float) else None
        print(f"| {name} | {ms} | {bw} |", flush=True)
        out.append({"variant": name, "graph_ms": ms, "gb_s": bw, "elements": elems})
        if "--json" in sys.argv:
            import json
            Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(
                {"meta": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, "rows": out}, indent=1))
    from head_trainer import adam8_triton
    adam8_triton.DIAG = 0


def main() -> None:
    if "--check" in sys.argv:
        check()
        return
    if "--ablate" in sys.argv:
        ablate()
        return
    from torchao.optim import AdamW8bit

    print(f"{sum(a * b for a, b in SHAPES):,} elements in {len(SHAPES)} tensors")
    rows = [("torchao AdamW8bit", lambda ps: AdamW8bit(ps, lr=1e-4, bf16_stochastic_round=True), 5),
            ("fused torch ops via inductor, automatic dynamic", fused_with({"dynamic": None}), 5),
            ("fused torch ops via inductor, static per shape", fused_with({"dynamic": False}), 5)]
    names = {0: "binary search", 1: "guess + bounds", 2: "table guess + bounds"}
    rows = [(f"triton kernel, {names[s]}{', fast math' if f else ''}, {r} blocks x "
             f"{w} warps", triton_with(r, w, s, f), 20)
            for r, w, s, f in ((1, 2, 1, 0), (1, 2, 2, 0), (1, 2, 1, 1), (1, 2, 2, 1), (2, 4, 1, 1), (1, 2, 0, 1),
                               (1, 4, 1, 1), (4, 4, 1, 0))] + rows
    elems = sum(a * b for a, b in SHAPES)
    print("| optimizer | ms / step | warm-up s | graph-replayed ms | GB/s at 10 B / element |\n| --- | --- | --- | --- | --- |")
    for name, make, n in rows:
        ms, warm = bench(make, n)
        try:
            gms = bench(make, n, graph=True)[0] if "torchao" not in name and "not compiled" not in name else None
        except Exception as exc:  # noqa: BLE001 - report and go on
            gms = f"{type(exc).__name__}"
        bw = round(10 * elems / (gms * 1e-3) / 1e9) if isinstance(gms, float) else ""
        print(f"| {name} | {ms} | {warm} | {gms} | {bw} |", flush=True)


if __name__ == "__main__":
    main()
