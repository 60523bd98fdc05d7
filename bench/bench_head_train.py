"""head-train at release shapes with random weights (GPU): step time, memory plans, update quality.

    python bench/bench_head_train.py --sections step,memory,quality --json-dir $OUT      # on the GPU box
    python bench/bench_head_train.py --tiny --device cpu --json-dir /tmp/b                # a CPU smoke run

Release head: Qwen3-VL-8B text config + expert_cfg (2048 hidden, 36 layers, 16/8 heads, 8256 MLP),
2.28 B parameters; prefixes of L = 2,993 (4 cameras) or 809 (front-only) random bf16 K/V on the GPU.
Each configuration runs in the same process after the previous one's optimizer, graphs and gradients
are freed; times are CUDA-event medians over the timed steps; memory is the peak allocated since the
configuration started, under `--memory-cap-gib` (torch.cuda.set_per_process_memory_fraction). Every
result is appended to <json-dir>/head_train_<section>.json as soon as it is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from head_trainer.memory import estimate, grads_persist  # noqa: E402
from head_trainer.optim import build_optimizer  # noqa: E402
from head_trainer.step import StepConfig, TrainStep  # noqa: E402
from head_trainer.trainable import apply_trainable, is_lora  # noqa: E402
from shared.config import RELEASE_EXPERT_OVERRIDES, HeadConfig  # noqa: E402
from shared.head import AlpamayoHead, KVPrefix  # noqa: E402

QWEN3VL_8B_TEXT = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=12288, rms_norm_eps=1e-6, vocab_size=155697,
                       rope_theta=5e6, max_position_embeddings=262144, hidden_act="silu", attention_bias=False,
                       rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"})
TINY_TEXT = dict(QWEN3VL_8B_TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=300,
                 rope_scaling={"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"})


def head_config(tiny: bool) -> HeadConfig:
    from transformers import Qwen3VLTextConfig

    text = Qwen3VLTextConfig(**(TINY_TEXT if tiny else QWEN3VL_8B_TEXT)).to_dict()
    over = ({"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "intermediate_size": 96} if tiny else RELEASE_EXPERT_OVERRIDES)
    aip = {"hidden_size": 32, "num_enc_layers": 2} if tiny else {}
    return HeadConfig.from_alpamayo_config({"expert_cfg": over, "action_in_proj_cfg": aip}, text)


class Batch:
    """What TrainStep reads: .action (B, 64, 2) and .prefix, already in place (the loader's Batch without the
    deferred K/V copy: prepare and release have nothing to do)."""

    def __init__(self, prefix: KVPrefix, action: torch.Tensor):
        self.prefix, self.action = prefix, action

    def prepare(self) -> Batch:
        return self

    def release(self) -> None:
        pass


def random_batch(cfg: HeadConfig, bsz: int, L: int, device, seed: int = 0, dtype=torch.bfloat16) -> Batch:
    g = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn((cfg.num_layers, 2, bsz, cfg.num_kv_heads, L, cfg.head_dim), generator=g, device=device,
                     dtype=dtype)
    prefix = KVPrefix([kv[i, 0] for i in range(cfg.num_layers)], [kv[i, 1] for i in range(cfg.num_layers)],
                      torch.full((bsz,), L, device=device), torch.full((bsz,), -2000, device=device))
    return Batch(prefix, torch.randn(bsz, 64, 2, generator=g, device=device))


def build_head(cfg: HeadConfig, device, dtype) -> AlpamayoHead:
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            head = AlpamayoHead(cfg)
    finally:
        torch.set_default_dtype(old)
    head.action_space.float()
    return head.train()


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out


def adam8_variant(rec: dict) -> None:
    """Record adamw8bit-fused's kernel variant (FAST, SEARCH, NUM_WARPS) in a result row."""
    try:
        from head_trainer import adam8_triton
    except ImportError:
        return
    rec["adam8_fast"], rec["adam8_search"] = adam8_triton.FAST, adam8_triton.SEARCH
    rec["adam8_warps"] = adam8_triton.NUM_WARPS


def use_adam8_fast() -> None:
    """--adam8-fast: adamw8bit-fused's fast-math kernel variant for every row of this process."""
    from head_trainer import adam8_triton

    adam8_triton.FAST = 1


def run_config(head, cfg, device, *, bsz, L, optimizer, mode="all", engine="graphs", checkpoint=False, draws=1,
               warm=3, timed=10, accum=1, recompute_attention=False, attention="sdpa", fused_wgrad=False) -> dict:
    """One configuration: steps with the chosen engine, returning times and memory."""
    rec = {"B": bsz, "L": L, "optimizer": optimizer, "trainable": mode, "engine": engine,
           "checkpoint": checkpoint, "draws": draws, "dtype": str(head.dtype).removeprefix("torch."),
           "recompute_attention": recompute_attention, "accum": accum, "attention": attention}
    if fused_wgrad:
        rec["fused_wgrad"] = True
    if attention == "split":
        import shared.prefix_attention as pa

        rec["prefix_chunk"] = pa.CHUNK
    if optimizer == "adamw8bit-fused":
        adam8_variant(rec)
    if is_lora(head) and mode != "lora":  # LoRA injects adapters into the head every configuration here shares
        raise ValueError("LoRA configurations must come last: the adapters stay in the shared head")
    params = apply_trainable(head, mode)  # a head with adapters keeps them
    n_params = sum(p.numel() for p in head.parameters())
    n_train = sum(p.numel() for p in params)
    est = estimate(cfg, n_params, n_train, rec["dtype"], optimizer, bsz, L, draws, kv_slots=1, checkpoint=checkpoint,
                   recompute_attention=recompute_attention, grads_persist=grads_persist(engine == "graphs", accum),
                   trainable=mode, attention=attention, compiled=engine in ("compiled", "graphs"))
    rec["estimate_gib"] = round(est.total / 2**30, 2)
    rec["estimate_terms_gib"] = {k: round(v / 2**30, 2) for k, v in vars(est).items() if k != "grads_persist"}
    free(device)
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    batch = random_batch(cfg, bsz, L, device, dtype=head.dtype)
    opt = build_optimizer(params, optimizer, 1e-5, capturable=engine == "graphs")
    step_cfg = StepConfig(seed=1, draws=draws, grad_accum=accum, compile=engine in ("compiled", "graphs"),
                          cuda_graphs=engine == "graphs", checkpoint=checkpoint, recompute_attention=recompute_attention,
                          attention=attention, fused_wgrad=fused_wgrad)
    counter = [0]
    if engine == "transformers":
        def one(s=counter):
            opt.zero_grad(set_to_none=True)
            gen = torch.Generator(device=device).manual_seed(s[0])
            head.flow_matching_loss(batch.action, batch.prefix, gen, draws).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            s[0] += 1
        ts = None
    else:
        ts = TrainStep(head, params, opt, step_cfg)

        def one(s=counter):
            ts([batch] * accum, 1e-5, s[0])
            s[0] += 1
    t0 = time.perf_counter()
    timer = Timer(device)
    timer(one, warm)
    rec["warmup_s"] = round(time.perf_counter() - t0, 2)
    times = timer(one, timed)
    rec["step_ms"] = round(1e3 * statistics.median(times), 2)
    rec["ms_per_sample"] = round(rec["step_ms"] / (bsz * accum), 3)
    if device.type == "cuda":
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        rec["base_gib"] = round(base / 2**30, 2)
    opt = batch = ts = one = None  # noqa: F841  (free the optimizer, graphs and inputs before the next config)
    for p in head.parameters():
        p.grad = None
    free(device)
    return rec


def record(path: Path, rec: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(rec)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rec), flush=True)


def guarded(fn, path: Path, **kw) -> None:
    try:
        rec = fn(**kw)
    except torch.cuda.OutOfMemoryError as exc:
        rec = {**{k: v for k, v in kw.items() if isinstance(v, int | float | str | bool)}, "error": "OOM",
               "detail": str(exc).splitlines()[0][:200]}
    except Exception as exc:  # keep the run going: one broken config must not cost the others
        rec = {**{k: v for k, v in kw.items() if isinstance(v, int | float | str | bool)},
               "error": f"{type(exc).__name__}: {exc}"[:400], "trace": traceback.format_exc()[-1500:]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record(path, rec)


def quality(cfg, device, out: Path, steps: int, L: int, bsz: int, plans: list[tuple[str, ...]]) -> None:
    """Fixed synthetic regression: 16 fixed prefixes -> fixed actions; loss per step of each plan."""
    gen = torch.Generator(device=device).manual_seed(123)
    n = 16
    data = [random_batch(cfg, bsz, L, device, seed=100 + i) for i in range(n // bsz)]
    ramp = torch.linspace(0.1, 1.0, 64, device=device).view(1, 64, 1)
    for b in data:  # targets: a fixed function of the prefix (+ fixed noise), so there is something to learn
        pooled = 4 * b.prefix.keys[0][:, 0, :, :2].float().mean(1).view(-1, 1, 2)
        b.action = torch.tanh(pooled * ramp) + 0.1 * torch.randn(b.action.shape, generator=gen, device=device)
    for dtype, opt_name, engine, *rest in plans:  # dtype:optimizer:engine[:attention]
        attention = rest[0] if rest else "sdpa"
        free(device)
        rec = {"dtype": dtype, "optimizer": opt_name, "engine": engine, "steps": steps, "L": L, "B": bsz}
        if attention != "sdpa":
            rec["attention"] = attention
        if opt_name == "adamw8bit-fused":
            adam8_variant(rec)
        try:
            head = build_head(cfg, device, getattr(torch, dtype))
            params = [p for p in head.parameters() if p.requires_grad]
            opt = build_optimizer(params, opt_name, 1e-4, capturable=engine == "graphs")
            ts = TrainStep(head, params, opt, StepConfig(seed=7, compile=engine != "eager", cuda_graphs=engine == "graphs",
                                                         attention=attention))
            losses = []
            t0 = time.perf_counter()
            for s in range(steps):
                b = data[s % len(data)]
                if dtype != "bfloat16":
                    b = Batch(b.prefix.to(dtype=getattr(torch, dtype)), b.action)
                lr = 1e-4 * min(1.0, (s + 1) / 20)
                losses.append(ts([b], lr, s).loss)
            rec["loss"] = [round(float(x), 5) for x in torch.stack(losses).cpu()]
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            del head, opt, ts, params
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
            rec["trace"] = traceback.format_exc()[-1500:]
        record(out / "head_train_quality.json", rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="step,memory,quality")
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run of this script)")
    ap.add_argument("--memory-cap-gib", type=float, default=24.0)
    ap.add_argument("--quality-steps", type=int, default=200)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--step-set", default="all", choices=["all", "graphs", "fused", "split"],
                    help="graphs: CUDA-graph configs only; fused: --step-optimizers side by side at the 24 GB plans")
    ap.add_argument("--step-rows", type=int, default=0, help="only the first N rows of --step-set split (0: all)")
    ap.add_argument("--step-pick", default="", help="only these rows (0-based, comma-separated) of --step-set split")
    ap.add_argument("--adam8-fast", action="store_true",
                    help="adamw8bit-fused's fast-math kernel (head_trainer/adam8_triton.FAST = 1) for every row")
    ap.add_argument("--prefix-chunk", type=int, default=None,
                    help="keys per program of --attention split's kernels (shared/prefix_attention.CHUNK) for every row")
    ap.add_argument("--adam8-search", type=int, choices=[0, 1, 2], default=None,
                    help="adamw8bit-fused's code search (head_trainer/adam8_triton.SEARCH) for every row")
    ap.add_argument("--step-optimizers", default="adamw8bit-fused,adamw8bit", help="optimizers of --step-set fused")
    ap.add_argument("--quality-plans", default="float32:adamw:eager,bfloat16:adamw8bit:graphs,bfloat16:adamw:graphs,"
                    "bfloat16:adamw4bit:graphs,bfloat16:adamw-sr:graphs", help="dtype:optimizer:engine[:attention], ...")
    ap.add_argument("--optimizers", default="adamw8bit,adamw,adamw4bit,adamw-sr,adamw-offload")
    ap.add_argument("--memory-lengths", default="", help="L values of the memory section for every optimizer and "
                    "trainable mode (default: both for adamw8bit, the long one for the rest)")
    ap.add_argument("--no-modes", action="store_true", help="memory section: skip the projections / LoRA rows")
    args = ap.parse_args()
    out = Path(args.json_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    cfg = head_config(args.tiny)
    long_l, short_l = (40, 12) if args.tiny else (2993, 809)
    batches = [int(b) for b in args.batches.split(",")]
    if args.prefix_chunk:
        import shared.prefix_attention as pa

        pa.CHUNK = args.prefix_chunk
    if args.adam8_search is not None:
        from head_trainer import adam8_triton

        adam8_triton.SEARCH = args.adam8_search
    if args.adam8_fast:
        use_adam8_fast()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "cap_gib": args.memory_cap_gib, "tiny": args.tiny}
    (out / "head_train_env.json").write_text(json.dumps(env) + "\n")
    print(env, flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sections = args.sections.split(",")
    if device.type == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    head = build_head(cfg, device, torch.bfloat16) if {"step", "memory"} & set(sections) else None

    if "step" in sections and args.step_set == "split":  # --attention split at the 24 GB plans, sdpa beside it
        path = out / "head_train_step.json"
        kw = dict(head=head, cfg=cfg, device=device, optimizer=args.step_optimizers.split(",")[0], engine="graphs")
        rows = [dict(bsz=8, L=long_l, attention="split"),
                dict(bsz=8, L=long_l, recompute_attention=True),  # the sdpa plan, same call
                dict(bsz=8, L=long_l, attention="split", accum=8, timed=3),
                dict(bsz=8, L=short_l, attention="split"),
                dict(bsz=16, L=long_l, attention="split"),
                dict(bsz=4, L=long_l, attention="split"),
                dict(bsz=8, L=long_l, attention="split", draws=2),
                dict(bsz=1, L=long_l, attention="split"),
                dict(bsz=8, L=long_l, attention="split", fused_wgrad=True),  # 8, 9: dW GEMMs into the buffers
                dict(bsz=8, L=long_l, attention="split", accum=8, timed=3, fused_wgrad=True)]
        if args.step_pick:
            rows = [rows[int(i)] for i in args.step_pick.split(",")]
        for row in rows[:args.step_rows or None]:
            guarded(run_config, path, **kw, **row)
    elif "step" in sections and args.step_set == "fused":  # the update kernels compared at the 24 GB plans
        path = out / "head_train_step.json"
        names = args.step_optimizers.split(",")
        for name in names:  # the headline first, for each optimizer: a timeout keeps what was measured
            guarded(run_config, path, head=head, cfg=cfg, device=device, optimizer=name, bsz=8, L=long_l,
                    engine="graphs", recompute_attention=True)
        kw = dict(head=head, cfg=cfg, device=device, optimizer=names[0])
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs")
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", checkpoint=True)
        guarded(run_config, path, **kw, bsz=8, L=short_l, engine="graphs", recompute_attention=True)
        guarded(run_config, path, **kw, bsz=4, L=long_l, engine="graphs", recompute_attention=True)
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", recompute_attention=True, draws=2)
        guarded(run_config, path, **kw, bsz=16, L=long_l, engine="graphs", checkpoint=True)
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", recompute_attention=True, accum=4, timed=5)
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", checkpoint=True, accum=8, timed=3)
    elif "step" in sections:  # most important first: a timeout keeps what was measured
        path = out / "head_train_step.json"
        kw = dict(head=head, cfg=cfg, device=device, optimizer="adamw8bit")
        graphs_only = args.step_set == "graphs"
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs")
        # no per-layer prefix copy kept: B = 8 without layer recompute under the cap; with accumulation
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", recompute_attention=True)
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", recompute_attention=True, accum=4, timed=5)
        if not graphs_only:
            for bsz in (1, 8):
                guarded(run_config, path, **kw, bsz=bsz, L=long_l, engine="transformers", warm=2, timed=5)
            guarded(run_config, path, **kw, bsz=8, L=long_l, engine="eager", warm=2, timed=5)
        for draws in (2, 4):
            guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", draws=draws)
        for bsz in [b for b in batches if b != 8]:
            guarded(run_config, path, **kw, bsz=bsz, L=long_l, engine="graphs")
        guarded(run_config, path, **kw, bsz=8, L=short_l, engine="graphs")
        guarded(run_config, path, **kw, bsz=8, L=long_l, engine="graphs", checkpoint=True)
        if not graphs_only:
            guarded(run_config, path, **kw, bsz=8, L=long_l, engine="compiled", warm=2, timed=5)
            guarded(run_config, path, **kw, bsz=1, L=long_l, engine="eager", warm=2, timed=5)

    if "memory" in sections:
        memory_lengths = [int(x) for x in args.memory_lengths.split(",") if x]
        path = out / "head_train_memory.json"
        for opt_name in args.optimizers.split(","):
            if opt_name == "adamw-offload":  # the CPU update (about 0.6 s a step): B = 4 only unless lengths are given
                for L, bsz in ([(L, b) for L in memory_lengths for b in (1, 4, 8)] or [(long_l, 4)]):
                    guarded(run_config, path, head=head, cfg=cfg, device=device, bsz=bsz, L=L, optimizer=opt_name,
                            engine="eager", warm=1, timed=2)
                continue
            lengths = memory_lengths or ([long_l, short_l] if opt_name == "adamw8bit" else [long_l])
            for L in lengths:
                for bsz in (1, 4, 8):
                    for ckpt in (False, True) if opt_name == "adamw8bit" else (False,):
                        guarded(run_config, path, head=head, cfg=cfg, device=device, bsz=bsz, L=L, optimizer=opt_name,
                                engine="eager", checkpoint=ckpt, warm=2, timed=2)
        mode_lengths = [] if args.no_modes else (memory_lengths or [long_l])
        for mode in ("projections", "lora"):  # lora last: the adapters stay in the head (rank 16, fp32)
            for L in mode_lengths:
                for bsz in (1, 4, 8):
                    guarded(run_config, path, head=head, cfg=cfg, device=device, bsz=bsz, L=L, optimizer="adamw",
                            mode=mode, engine="eager", warm=2, timed=2)
        if mode_lengths:  # LoRA under CUDA graphs (captures since the third H100 session's stream fix)
            guarded(run_config, path, head=head, cfg=cfg, device=device, bsz=8, L=long_l, optimizer="adamw",
                    mode="lora", engine="graphs")

    if "quality" in sections:  # uncapped: fp32 AdamW is the reference and needs ~40 GB
        del head
        free(device)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        quality(cfg, device, out, args.quality_steps, short_l, 4,
                [tuple(p.split(":")) for p in args.quality_plans.split(",")])


if __name__ == "__main__":
    main()
