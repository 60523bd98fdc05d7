"""The Triton kernels compile for the GPU box's sm_90 here, without a GPU (ptxas ships in Triton's wheel).

The interpreter tests check the kernels' numbers on the CPU, but the interpreter runs Python: a type or
constexpr mistake that only the compiler sees would otherwise surface first on the device, after its
minutes were spent. bench/compile_kernels_sm90.py compiles every variant; here the shipped ones and the
table search with fast math."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compile_kernels_sm90 as ck  # noqa: E402


def test_shipped_kernels_compile_for_sm90():
    picked = [v for v in ck.prefix_variants() if " bf16" in v[0]]  # forward / backward, bf16 and int8 prefixes
    picked += list(ck.adam8_variants())[:4]  # as shipped, table search + fast math; bf16, fp32
    assert len(picked) == 4 + 4 and "fast 1" in picked[-1][0]
    for name, fn, types, consts, warps, stages in picked:
        assert ck.compile_one(fn, types, consts, warps, stages) > 10_000, name
    name, fn, types, consts, warps, stages = picked[0]
    with pytest.raises(Exception, match="arange"):  # what the compiler refuses surfaces here (a 48-row tile)
        ck.compile_one(fn, types, {**consts, "BM": 48}, warps, stages)
