"""Compile the project's Triton kernels for an H100 / H200 (sm_90) on a machine without a GPU.

    python bench/compile_kernels_sm90.py        # prints one line per variant; exits 1 if any fails
    python bench/compile_kernels_sm90.py --json docs/kernel_resources_sm90.json   # + registers per variant

Triton's wheel carries ptxas, so each kernel goes through the same front end, passes and ptxas as on the
GPU box: a type or constexpr error that the CPU interpreter lets through fails here, before device time
is spent. Compiling is not running: the numbers are checked by the interpreter tests and, on the GPU,
by `bench_prefix_attention.py --check` and `diag_adam8.py --check`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import shared.prefix_attention as pa  # noqa: E402
from head_trainer import adam8_triton as a8  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict, consts: dict, warps: int, stages: int):
    """fn compiled for TARGET (the CompiledKernel); types: arg -> Triton type string, consts: arg -> value."""
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET,
                          options={"num_warps": warps, "num_stages": stages})


def compile_one(fn, types: dict, consts: dict, warps: int, stages: int) -> int:
    """PTX bytes of fn compiled for TARGET."""
    return len(compile_kernel(fn, types, consts, warps, stages).asm["ptx"])


def resources(kernel, warps: int) -> dict:
    """Registers per thread and stack bytes (ptxas's allocation, from cuobjdump in Triton's wheel) and the
    warps an H100 / H200 SM can hold at that register count (65,536 registers, at most 32 blocks, 64 warps)."""
    import os
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(re.search(rf"{k}:(\d+)", out).group(1)) for k in ("REG", "STACK"))
    blocks = min(32, 65536 // (regs * 32 * warps), 64 // warps)
    return {"registers": regs, "stack_bytes": stack, "warps_per_sm": blocks * warps}


def prefix_variants():
    ints = {n: "i32" for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sdb", "sdh", "sdm",
                               "slb", "slh", "sdmb", "sdmh", "H", "M", "n_split", "chunk", "L_MAX")}
    for quant in (False, True):
        for dt in ("bf16", "fp32"):
            kv = "*i8" if quant else f"*{dt}"
            types = {"Q": f"*{dt}", "K": kv, "V": kv, "LEN": "*i32", "OUT": "*fp32", "LSE": "*fp32", "KS": "*fp32",
                     "VS": "*fp32", "DO": "*fp32", "DM": "*fp32", "DQ": "*fp32", "scale": "fp32", "scale2": "fp32",
                     **ints}
            consts = {"D": 128, "BM": pa.BLOCK_M, "BN": pa.BLOCK_N, "IEEE": dt == "fp32", "QUANT": quant}
            for fn in (pa._fwd_kernel, pa._bwd_kernel):
                yield f"{fn.fn.__name__} {dt}{' int8' if quant else ''}", fn, types, consts, pa.NUM_WARPS, pa.NUM_STAGES


def adam8_variants():
    types = {"p_ptr": "*bf16", "g_ptr": "*bf16", "mc_ptr": "*u8", "ms_ptr": "*fp32", "vc_ptr": "*u8", "vs_ptr": "*fp32",
             **{n: "*fp32" for n in ("qm_ptr", "qv_ptr", "bm_ptr", "bv_ptr", "coef_ptr", "lr_ptr", "c1_ptr", "c2_ptr",
                                     "step_ptr")},
             "n_blocks": "i32", "salt": "i32", "w1": "fp32", "w2": "fp32", "eps": "fp32", "wd": "fp32"}
    variants = [(a8.SEARCH, a8.FAST, a8.ROWS, a8.NUM_WARPS), (2, 1, 1, 1), (1, 0, 1, 2), (2, 1, 1, 2), (0, 0, 1, 2)]
    variants += [(1, 0, 2, 4), (1, 0, 4, 4), (1, 0, 8, 8), (1, 0, 1, 1)]  # run 1's, bf16 only
    for i, (search, fast, rows, warps) in enumerate(variants):
        for sr, dt in ((True, "bf16"), (False, "fp32"))[:2 if i < 5 else 1]:
            consts = {"SR": sr, "SEARCH": search, "FAST": fast, "ROWS": rows, "BLOCK": a8.BLOCK, "DIAG": 0}
            t = {**types, "p_ptr": f"*{dt}", "g_ptr": f"*{dt}"}
            yield (f"_adamw8_kernel {dt} search {search} fast {fast} rows {rows} x {warps} warps",
                   a8._adamw8_kernel, t, consts, warps, 1)


def main() -> int:
    import json

    bad, rows = 0, []
    for name, fn, types, consts, warps, stages in [*prefix_variants(), *adam8_variants()]:
        try:
            k = compile_kernel(fn, types, consts, warps, stages)
            res = resources(k, warps)
            rows.append({"variant": name, "warps": warps, **res})
            print(f"ok   {name}: {len(k.asm['ptx']):,} B of PTX, {res}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every variant
            bad += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(
            {"meta": {"triton": triton.__version__, "target": "sm_90", "command": "python bench/compile_kernels_sm90.py"
                      " --json docs/kernel_resources_sm90.json", "machine": "the 2-core dev box, no GPU"},
             "rows": rows}, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
