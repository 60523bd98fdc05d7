"""The head-train tables of docs/PERFORMANCE.md (bench_head_train*_{h200,h100}.json,
bench_head_step_profile_{h200,h100}.json, bench_head_train_e2e_{h200,h100}.json, live_eval_h200.json);
registered into perf_format.RENDERERS on import. One renderer per table kind, registered once per machine's
bench file (the H200 session of 2026-12-01, the H100 session of 2026-12-07)."""

from __future__ import annotations

from decimal import Decimal
from functools import cache

from perf_format import fmt, load, prose, renderer, table

ENGINE = {"graphs": "fast expert, compiled + CUDA graphs", "compiled": "fast expert, compiled", "eager": "fast expert, eager",
          "transformers": "transformers modules (Stage-2 path)"}


def _b_int(r) -> int:
    """The micro-batch of a row (failed rows record the bench's argument name, bsz)."""
    return int(r.get("B", r.get("bsz")))


def _b(r) -> str:
    """The micro-batch, with the accumulation count when there is one (8 x 4)."""
    n = r.get("accum", 1)
    return f"{_b_int(r)} x {n}" if n > 1 else str(_b_int(r))


def _oom(r) -> bool:
    return r.get("error") == "OOM"


def _pct(x, places: int = 0) -> str:
    """A signed percentage; one that rounds to zero prints as 0 %."""
    t = fmt(x, places)
    return "0 %" if Decimal(t) == 0 else f"{'+' if x > 0 else ''}{t} %"


@cache
def _params(trainable: str) -> tuple[int, int]:
    from bench_head_train import head_config

    from head_trainer.memory import count_params
    return count_params(head_config(False), trainable)


def estimate_now(r: dict) -> Decimal:
    """GiB that head_trainer/memory.py (as committed now) estimates for a bench row's configuration, with
    the bench's one KV input slot; a change of the estimate shows here as a stale table."""
    from bench_head_train import head_config

    from head_trainer.memory import estimate, grads_persist
    trainable = r.get("trainable", r.get("mode", "all"))
    n, n_train = _params(trainable)
    est = estimate(head_config(False), n, n_train, r.get("dtype", "bfloat16"), r["optimizer"], _b_int(r),
                   int(r["L"]), int(r.get("draws", 1)), kv_slots=1, checkpoint=bool(r.get("checkpoint")),
                   recompute_attention=bool(r.get("recompute_attention")),
                   grads_persist=grads_persist(r.get("engine") == "graphs", int(r.get("accum", 1))),
                   trainable=trainable, attention=r.get("attention", "sdpa"),
                   compiled=r.get("engine") in ("graphs", "compiled"))
    return Decimal(str(round(est.total / 2**30, 3)))


def _recompute(r) -> str:
    """What the backward recomputes: whole layers (--gradient-checkpointing), attention only, or nothing."""
    return "layers" if r.get("checkpoint") else ("attention" if r.get("recompute_attention") else "no")


def _opt(r) -> str:
    """The optimizer, with adamw8bit-fused's fast-math kernel named where a row used it."""
    return r["optimizer"] + (" (fast math)" if r.get("adam8_fast") else "")


def _engine(r) -> str:
    return ENGINE[r["engine"]] + (", split attention" if r.get("attention") == "split" else "")


def step_table(name: str = "bench_head_train_step_h200.json", optimizer_column: bool = False) -> str:
    rows = []
    for r in load(name)["rows"]:
        cfg = [_engine(r), _b(r), fmt(r["L"], 0, sep=True), str(r.get("draws", 1)), _recompute(r)]
        cfg = [_opt(r), *cfg] if optimizer_column else cfg
        if "error" in r:
            rows.append(cfg + ["OOM under the 24 GiB cap" if _oom(r) else r["error"][:60], "", "", str(r["run"])])
            continue
        rows.append(cfg + [fmt(r["step_ms"], 1), f"**{fmt(r['ms_per_sample'], 1)}**",
                           f"{fmt(r['peak_gib'], 1)} / {fmt(r['peak_reserved_gib'], 1)}", str(r["run"])])
    return table((["optimizer"] if optimizer_column else []) + ["step", "B", "L", "draws", "recompute", "ms / step",
                  "ms / sample", "peak GiB (alloc / reserved)", "run"], rows)


def profile_table(name: str = "bench_head_step_profile_h200.json") -> str:
    rows, runs = [], all("run" in r for r in load(name)["rows"])
    for r in load(name)["rows"]:
        rows.append([_opt(r) + (", split attention" if r.get("attention") == "split" else ""), str(r["B"]),
                     fmt(r["L"], 0, sep=True), _recompute(r), fmt(r["fwd_bwd_graph_ms"], 1),
                     fmt(r["clip_update_graph_ms"], 1), fmt(r["zero_grads_ms"], 1), f"**{fmt(r['step_ms'], 1)}**",
                     fmt(r["step_ms"] / r["B"], 1), fmt(r["peak_gib"], 1)] + ([str(r["run"])] if runs else []))
    return table(["optimizer", "B", "L", "recompute", "forward + backward graph ms", "clip + update graph ms",
                  "zero grads ms", "step ms", "ms / sample", "peak GiB"] + (["run"] if runs else []), rows)


@renderer("head_step_kernels")
def kernels_table() -> str:
    (r,) = [r for r in load("bench_head_step_profile_h200.json")["rows"] if "eager_kernels" in r]
    total, *ks = r["eager_kernels"]
    rows = [[f"`{k['name'][:72]}`", str(k["calls"]), fmt(k["ms"], 1), f"{fmt(100 * k['ms'] / total['total_ms'], 0)} %"]
            for k in ks[:6]]
    head = prose(f"Kernels of one step ({r['optimizer']}, B = {r['B']}, L = {fmt(r['L'], 0, sep=True)}) under "
                 f"torch.profiler: {fmt(total['total_ms'], 1)} ms of GPU time in {total['kernels']} distinct kernels; "
                 "the six largest:")
    return head + "\n" + table(["kernel", "calls", "ms", "share"], rows)


def memory_table(name: str = "bench_head_train_memory_h200.json") -> str:
    d, rows = load(name), []
    runs = "runs" in d["meta"]  # a run column where the file holds several calls
    for r in d["rows"]:
        cfg = [r["optimizer"], r.get("trainable", r.get("mode", "all")), _b(r), fmt(r["L"], 0, sep=True), _recompute(r)]
        if "error" in r and r.get("engine") == "graphs":  # no estimate: the eager columns do not apply
            rows.append(cfg + ["", f"graphs: {r['error'].splitlines()[0][:70]}", "", ""])
            continue
        if "error" in r:
            rows.append(cfg + [fmt(estimate_now(r), 1), "OOM under the 24 GiB cap" if _oom(r) else r["error"][:60],
                               "", ""])
            continue
        est = estimate_now(r)
        err = 100 * (est - r["peak_gib"]) / r["peak_gib"]
        rows.append(cfg + [fmt(est, 1), fmt(r["peak_gib"], 1), _pct(err),
                           fmt(r["ms_per_sample"], 0)])
    if runs:
        rows = [row + [str(r.get("run", 1))] for row, r in zip(rows, d["rows"])]
    return table(["optimizer", "trainable", "B", "L", "recompute", "estimate GiB", "peak GiB (eager)",
                  "estimate error", "eager ms / sample"] + ["run"] * runs, rows)


def graph_memory_table(name: str = "bench_head_train_step_h200.json") -> str:
    """Estimate vs peak for the CUDA-graph runs (the engine the presets use)."""
    rows = []
    for r in load(name)["rows"]:
        if r.get("engine") != "graphs":
            continue
        if "error" in r:
            rows.append([_b(r), fmt(r["L"], 0, sep=True), str(r.get("draws", 1)), _recompute(r),
                         fmt(estimate_now(r), 1), "OOM under the 24 GiB cap" if _oom(r) else r["error"][:60], "",
                         str(r["run"])])
            continue
        est = estimate_now(r)
        err = 100 * (est - r["peak_gib"]) / r["peak_gib"]
        rows.append([_b(r), fmt(r["L"], 0, sep=True), str(r["draws"]), _recompute(r), fmt(est, 1),
                     fmt(r["peak_gib"], 1), _pct(err), str(r["run"])])
    return table(["B", "L", "draws", "recompute", "estimate GiB", "peak GiB (graphs)", "estimate error", "run"], rows)


def _tail_mean(xs, n=10) -> Decimal:
    return sum(xs[-n:]) / len(xs[-n:])


def quality_table(name: str = "bench_head_train_quality_h200.json") -> str:
    rows, ref = [], None
    for r in load(name)["rows"]:
        last = _tail_mean(r["loss"])
        ref = last if r["dtype"] == "float32" else ref
        vs = "reference" if r["dtype"] == "float32" else _pct(100 * (last - ref) / ref, 1)
        rows.append([f"{r['dtype']} + {r['optimizer']}", r["engine"], str(len(r["loss"])), fmt(r["loss"][0], 3),
                     fmt(_tail_mean(r["loss"][:10]), 3), f"**{fmt(last, 3)}**", vs, str(r["run"])])
    return table(["weights + optimizer", "step", "steps", "first loss", "mean loss, steps 1-10",
                  "mean loss, last 10 steps", "vs fp32 AdamW", "run"], rows)


def _e2e(section: str, run: int | None = None, name: str = "bench_head_train_e2e_h200.json") -> list[dict]:
    return [r for r in load(name)["rows"] if r["section"] == section and (run is None or r["run"] == run)]


def stage2_table(name: str = "bench_head_train_e2e_h200.json") -> str:
    rows = [[name, fmt(r[f"{c}_prefix_len"], 0, sep=True), fmt(r[f"{c}_prefill_B1_ms"], 0),
             fmt(r[f"{c}_expert_step_B1_ms"], 0), f"**{fmt(r[f'{c}_stage2_ms_per_sample'], 0)}**", str(r["run"])]
            for r in _e2e("stage2", name=name) for c, name in (("4cam", "4 cameras"), ("front", "front-only"))]
    return table(["prefix", "L", "VLM prefill B=1 ms", "expert step B=1 ms (transformers, AdamW)",
                  "Stage-2 ms / sample", "run"], rows)


def stores_table(name: str = "bench_head_train_e2e_h200.json") -> str:
    rows = [[r["name"], str(r["samples"]), fmt(r["L"], 0, sep=True), r["quant"], fmt(1000 * r["GB"] / r["samples"], 0),
             fmt(r["build_s"], 1), f"{fmt(r['read_GBps'], 2)} GB/s" + ("" if r["cache_dropped"] else " (cache warm)"),
             str(r["run"])] for r in _e2e("store", name=name)]
    return table(["store", "samples", "L", "K/V", "MB / sample on disk", "write s", "disk read, page cache dropped",
                  "run"], rows)


@renderer("head_train_loader")
def loader_table() -> str:
    rows = [[r["name"], str(r["workers"]), "yes" if r["ram_held"] else "no", fmt(r["samples_per_s"], 1),
             f"**{fmt(r['ms_per_sample'], 2)}**", fmt(r["tier_fill_s"], 1)] for r in _e2e("loader")]
    return table(["store", "workers", "RAM tier holds the store", "samples / s to the GPU (page cache warm)", "ms / sample",
                  "tier fill s"], rows)


_FLAGS = ("--gradient-checkpointing", "--recompute-attention", "--optimizer", "--attention")


def e2e_table(name: str = "bench_head_train_e2e_h100.json") -> str:
    """head-train end to end per store against the Stage-2 per-sample cost of the same call."""
    rows = []
    for r in _e2e("e2e", name=name):
        (s2,) = _e2e("stage2", run=r["run"], name=name)
        args = r["cmd"].split()
        flags = [f"{a} {args[i + 1]}" if a in ("--optimizer", "--attention") else a
                 for i, a in enumerate(args) if a in _FLAGS]
        sm = r.get("summary")
        if sm is None or r["rc"] != 0:
            rows.append([r["name"], ", ".join(flags), f"rc {r['rc']}", "", "", "", "", "", "", str(r["run"])])
            continue
        ref = s2["4cam_stage2_ms_per_sample" if r["name"].startswith("4cam") else "front_stage2_ms_per_sample"]
        rows.append([r["name"], ", ".join(flags), str(sm["steps"]), fmt(sm["steady_ms_per_sample"], 1),
                     f"{fmt(100 * sm['gpu_busy_fraction'], 0)} %", f"{fmt(100 * sm['steady_loader_wait_fraction'], 1)} %",
                     fmt(sm["peak_gpu_gib"], 1), fmt(ref, 0), f"**{fmt(ref / sm['steady_ms_per_sample'], 1)}x**",
                     str(r["run"])])
    return table(["store", "flags (all: bf16, B = 8, --compile --cuda-graphs, 24 GiB budget, RAM tier)", "steps",
                  "steady ms / sample", "GPU busy", "loader wait", "peak GiB", "Stage-2 ms / sample (same call)",
                  "ratio", "run"], rows)


def adam8_update_table(name: str = "bench_adam8_update_h100.json") -> str:
    """bench/diag_adam8.py: one update of 214 M bf16 elements, eager launches and graph-replayed."""
    rows = []
    for r in load(name)["rows"]:
        g = r["graph_ms"]
        bw = fmt(10 * r["elements"] / (g * Decimal("1e-3")) / Decimal("1e9"), 0) if g is not None else ""
        rows.append([r["optimizer"], fmt(r["ms_per_step_eager"], 2), fmt(r["warmup_s"], 1),
                     fmt(g, 2) if g is not None else "not captured", bw, str(r.get("run", 1))])
    return table(["update", "ms / step (eager launches)", "warm-up s", "ms / step (graph replay)",
                  "GB/s at 10 B / element", "run"], rows)


def prefix_attention_table(name: str) -> str:
    """bench/bench_prefix_attention.py: one layer's attention core (B = 8, graph-replayed medians), SDPA over
    [prefix; action] copies against the split attention, per tile (CHUNK, BLOCK_M, BLOCK_N, warps, stages)."""
    rows = []
    for r in load(name)["rows"]:
        if r["path"] == "errors vs fp32":
            continue
        what = {"sdpa": "SDPA over [prefix; action]", "sdpa_recompute": "SDPA, attention recompute",
                "split": "split (prefix op + action block)", "split_int8": "split over int8 codes"}[r["path"]]
        tile = " x ".join(str(t) for t in r["tile"]) if "tile" in r else ""
        cells = [fmt(r[k], 3) if k in r else ("error" if "error" in r else "") for k in ("fwd_ms", "fwd_bwd_ms")]
        rows.append([f"{r['L']:,}", what, tile, *cells])
    return table(["L", "attention", "tile (chunk x M x N x warps x stages)", "forward ms", "forward + backward ms"],
                 rows)


def prefix_attention_errors(name: str) -> str:
    """Max |error| against the fp32 SDPA computation, per path and output (o, dq, dk, dv)."""
    names = {"sdpa": "SDPA (bf16)", "split": "split (bf16)", "split_fp32": "split (fp32)",
             "split_dequant_bf16": "int8 prefix dequantised to bf16, split (vs fp32 over the dequantised prefix)",
             "split_int8": "int8 codes read in place, split (vs fp32 over the dequantised prefix)"}
    rows = [[f"{r['L']:,}", names[path], *(f"{Decimal(str(r[path][k])):.2e}" for k in ("o", "dq", "dk", "dv"))]
            for r in load(name)["rows"] if r["path"] == "errors vs fp32" for path in names if path in r]
    return table(["L", "path (dtype)", "o", "dq", "dk", "dv"], rows)


def adam8_ablate_table(name: str) -> str:
    """bench/diag_adam8.py --ablate: the kernel with parts switched off beside a copy of the same bytes."""
    rows = []
    for r in load(name)["rows"]:
        ok = not isinstance(r["graph_ms"], str)
        rows.append([r["variant"], fmt(r["graph_ms"], 2) if ok else r["graph_ms"], fmt(r["gb_s"], 0) if ok else "",
                     str(r["run"])])
    return table(["variant (214 M elements, graph-replayed)", "ms", "GB/s at 10 B / element", "run"], rows)


KERNEL_GROUPS = (  # (group, substrings of the kernel name), first match wins
    ("attention over [prefix; action] (cuDNN SDPA)", ("sdpa",)),
    ("attention over the prefix (shared/prefix_attention.py)", ("_fwd_kernel", "_bwd_kernel")),
    ("kernels with a cat: the [prefix; action] copies (RoPE fused in)", ("_cat_",)),
    ("matrix multiplies (cuBLAS)", ("nvjet", "gemm", "cutlass")),
    ("optimizer update + clip", ("_adamw8_kernel", "multi_tensor_apply", "randint")),
)


def kernel_groups_table(name: str) -> str:
    """The eager step's kernel time (torch.profiler, profile_head_step.py's p flag) by group; 'other' is
    the profile's total less the listed top kernels' groups (norms, activations, residual adds, copies)."""
    rows = []
    for r in load(name)["rows"]:
        if "eager_kernels" not in r:
            continue
        total, *ks = r["eager_kernels"]
        sums = {g: Decimal(0) for g, _ in KERNEL_GROUPS}
        for k in ks:
            for g, keys in KERNEL_GROUPS:
                if any(x in k["name"] for x in keys):
                    sums[g] += Decimal(str(k["ms"]))
                    break
        other = Decimal(str(total["total_ms"])) - sum(sums.values())
        label = f"B = {r['B']}, L = {r['L']:,}" + (", attention recompute" if r.get("recompute_attention") else "") + \
            (f", attention {r['attention']}" if r.get("attention") else "")
        for g, v in [*sums.items(), ("other kernels", other)]:
            if v:
                rows.append([label, g, fmt(v, 2), str(r.get("run", 1))])
        rows.append([label, "**all kernels (eager step)**", fmt(total["total_ms"], 2), str(r.get("run", 1))])
    return table(["step", "kernels", "GPU ms", "run"], rows)


for _gpu in ("h200", "h100"):  # one region per table and machine
    renderer(f"head_step_profile{'' if _gpu == 'h200' else '_h100'}")(
        lambda g=_gpu: profile_table(f"bench_head_step_profile_{g}.json"))
    renderer(f"head_train_quality{'' if _gpu == 'h200' else '_h100'}")(
        lambda g=_gpu: quality_table(f"bench_head_train_quality_{g}.json"))
    renderer(f"stage2_reference{'' if _gpu == 'h200' else '_h100'}")(
        lambda g=_gpu: stage2_table(f"bench_head_train_e2e_{g}.json"))
    renderer(f"head_train_stores{'' if _gpu == 'h200' else '_h100'}")(
        lambda g=_gpu: stores_table(f"bench_head_train_e2e_{g}.json"))
    renderer(f"head_train_graph_memory{'' if _gpu == 'h200' else '_h100'}")(
        lambda g=_gpu: graph_memory_table(f"bench_head_train_step_{g}.json"))
renderer("head_train_step")(step_table)
renderer("head_train_memory")(memory_table)
renderer("head_train_memory_h100")(lambda: memory_table("bench_head_train_memory_h100.json"))
renderer("adam8_update_h100")(adam8_update_table)
renderer("head_step_kernels_h100")(lambda: kernel_groups_table("bench_head_step_profile_h100.json"))
renderer("head_train_step_h100")(lambda: step_table("bench_head_train_step_h100.json", optimizer_column=True))
renderer("head_train_e2e_h100")(e2e_table)


@renderer("live_eval_h200")
def live_eval_table() -> str:
    d = load("live_eval_h200.json")
    rows = []
    for pixels, run in d["runs"].items():
        sm = run["live"]["summary"]
        mets = sm["metrics"]
        worst = max(m["max_abs_diff"] for m in mets.values())
        rows.append([f"{d['gpu']}, {d['device']}", f"{d['kv_dtype']}, {pixels} pixels",
                     f"{sm['token_ids_equal']}/{sm['token_ids_checked']} equal",
                     f"{sm['rope_delta_equal']}/{sm['samples']} equal",
                     f"{fmt(sm['k_max_abs_diff'], 0)} / {fmt(sm['v_max_abs_diff'], 0)}",
                     f"{fmt(sm['traj_max_abs_diff_m'], 0)} m",
                     f"{fmt(worst, 0)} (min_ade {fmt(mets['min_ade']['cached'], 4)} both)"])
    return table(["machine", "store", "token ids", "rope delta", "K / V max abs diff", "trajectories max abs diff",
                  "metrics max abs diff"], rows)
renderer("prefix_attention_h100")(lambda: prefix_attention_table("bench_prefix_attention_h100.json"))
renderer("prefix_attention_errors_h100")(lambda: prefix_attention_errors("bench_prefix_attention_h100.json"))
renderer("adam8_ablate_h100")(lambda: adam8_ablate_table("bench_adam8_ablate_h100.json"))


@renderer("kernel_resources_sm90")
def kernel_resources_table() -> str:
    """bench/compile_kernels_sm90.py --json: ptxas's registers per thread and stack per kernel variant (compiled
    for sm_90 without a GPU) and the warps an SM holds at that count."""
    d = load("kernel_resources_sm90.json")
    rows = [[r["variant"].replace("_adamw8_kernel", "update").replace("_fwd_kernel", "split forward")
             .replace("_bwd_kernel", "split backward"), str(r["warps"]), str(r["registers"]), str(r["stack_bytes"]),
             str(r["warps_per_sm"])] for r in d["rows"]]
    return table(["kernel variant (dtype, options)", "warps / program", "registers / thread", "stack bytes",
                  "warps / SM at that count (of 64)"], rows) + f"\n(Triton {d['meta']['triton']}, sm_90)\n"
