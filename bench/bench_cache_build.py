"""cache-build at release shapes with random weights (GPU): prefill, build throughput, memory, bytes, rollout.

    python bench/bench_cache_build.py --json $OUT/cache_build.json

Qwen3-VL-8B shapes (text 4096 x 36 layers, 32/8 heads, vocab 155,697; vision depth 27), 16 images of
1080x1920 -> 320x576 (4 cameras x 4 frames) or 4 images (front-only). Prints a table; timings are
medians with CUDA synchronisation. Results and the command are recorded in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder.cache_build import BuildConfig, Builder, cpu_stage_loader  # noqa: E402
from cache_builder.vlm import prefill  # noqa: E402
from shared.action_space import UnicycleAccelCurvature  # noqa: E402
from shared.config import RELEASE_EXPERT_OVERRIDES, HeadConfig  # noqa: E402
from shared.head import AlpamayoHead, KVPrefix  # noqa: E402
from shared.prompt import MaskTrajTokens  # noqa: E402
from shared.qwen_files import load_processor, write_tiny_processor  # noqa: E402
from shared.sample import RELEASE_CAMERAS, Sample  # noqa: E402
from shared.store import KVSpec, Store, StoreWriter  # noqa: E402


def release_vlm(tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=12288, rms_norm_eps=1e-6, vocab_size=155697,
                         rope_theta=5e6, rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                       "rope_type": "default"}, tie_word_embeddings=False),
        vision_config=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        vlm = Qwen3VLForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    return vlm.eval().requires_grad_(False)


_FRAMES: dict[int, np.ndarray] = {}


def fake_sample(i: int, cams: tuple[str, ...]) -> Sample:
    """A 1080p sample with a planted curve; frames are one random base per camera count, shifted per sample
    (cheap enough to make inside the CPU-stage workers)."""
    n = len(cams)
    if n not in _FRAMES:
        _FRAMES[n] = np.random.default_rng(n).integers(0, 256, (n, 4, 3, 1080, 1920), dtype=np.uint8)
    t = np.arange(-15, 65) * 0.1
    kappa = 0.05 * (t > 0.3)
    yaw = np.cumsum(kappa * 10 * 0.1)
    xyz = np.stack([np.cumsum(10 * 0.1 * np.cos(yaw)), np.cumsum(10 * 0.1 * np.sin(yaw)), 0 * t], -1)
    xyz -= xyz[15]
    rot = np.zeros((80, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = (np.cos(yaw), -np.sin(yaw), np.sin(yaw),
                                                                             np.cos(yaw), 1)
    return Sample(f"clip{i:04d}", 5_100_000, _FRAMES[n] + np.uint8(i % 256), cams,
                  np.arange(n), np.zeros((n, 4), np.int64), xyz[:16], rot[:16], xyz[16:], rot[16:],
                  camera_config="full" if n == 4 else "front-only")


class FakeSamples:
    """`samples(w, n)` for the CPU stage: sample ids offset..offset+count split over the workers."""

    def __init__(self, cams: tuple[str, ...], count: int, offset: int = 0):
        self.cams, self.count, self.offset = cams, count, offset

    def __call__(self, w: int, n: int):
        return (fake_sample(i, self.cams) for i in range(self.offset + w, self.offset + self.count, n))


def cuda_time(fn, reps=5, warm=2) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def timed(items):
    """Pass items through; `.t_first` is when the first one arrived (CPU-stage start-up excluded)."""
    def gen():
        for it in items:
            if gen.t_first is None:
                gen.t_first = time.perf_counter()
            yield it
    gen.t_first = None
    return gen


class StagingOnly(StoreWriter):
    """A control: the writer's GPU staging (stack/quantise, NaN count, pinned copy), then nothing written."""

    def _write_one(self, s, ready=None) -> None:
        arrays, _, _ = self._host_arrays(s, ready)
        with self._lock:
            self.samples_written += 1
            self._bytes_logical += sum(a.nbytes for a in arrays.values())


class TimedWriter:
    """The store writer, with the time each record was handed over (backpressure makes that the pace
    once the writer's queue is full; `commit_pace` is the stricter measure)."""

    def __init__(self, w: StoreWriter):
        self.w, self.times = w, []

    def write(self, rec) -> None:
        self.w.write(rec)
        self.times.append(time.perf_counter())

    def __getattr__(self, name):
        return getattr(self.w, name)

    def steady_s_per_sample(self) -> float:
        """Seconds per sample over the last three quarters of the hand-overs (fill and drain excluded)."""
        t = self.times
        a = len(t) // 4
        return (t[-1] - t[a]) / max(1, len(t) - 1 - a)


def commit_pace(url: str) -> float:
    """Seconds per sample between commits over the last three quarters of a store's samples (the
    writer's completion pace, from each manifest's `written` time)."""
    import datetime as dt

    st = Store.open(url)
    t = sorted(dt.datetime.fromisoformat(st.manifest(k)["written"]).timestamp() for k in st.keys())
    if len(t) < 4:  # nothing committed (the stage-only control)
        return float("nan")
    a = len(t) // 4
    return (t[-1] - t[a]) / max(1, len(t) - 1 - a)


def disk_write_gbps(path: Path, gb: float = 4.0) -> float:
    """Sequential O_DIRECT write speed of the store's disk (dd), GB/s."""
    f = path / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=64M", f"count={int(gb * 1e9 / 2**26)}", "oflag=direct"],
                   check=True, capture_output=True)
    dt = time.perf_counter() - t0
    f.unlink()
    return int(gb * 1e9 / 2**26) * 2**26 / dt / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="cache_build_bench.json")
    ap.add_argument("--samples", type=int, default=48, help="samples per build")
    ap.add_argument("--workers", type=int, default=4, help="CPU-stage processes")
    ap.add_argument("--writer-threads", type=int, default=8)
    ap.add_argument("--writer-processes", type=int, default=8, help="0: the writer's threads write (in-process)")
    ap.add_argument("--dir", default=None, help="where stores go (default: a temp dir)")
    ap.add_argument("--no-rollout", action="store_true")
    ap.add_argument("--builds", default="4cam:none,4cam:int8,4cam:int4,front:none,front:int8,front:int4",
                    help="which builds to run, cams:quant")
    ap.add_argument("--minimal", action="store_true", help="skip the writer-only rows and velocity errors")
    ap.add_argument("--rollout-sizes", default="1,8,16", help="rollout batch sizes")
    ap.add_argument("--codec", default="zstd", choices=("zstd", "blosc-lz4", "none"), help="lossless codec of the builds")
    ap.add_argument("--writer", choices=("full", "stage-only"), default="full",
                    help="stage-only: a control that stages K/V to the host and writes nothing")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 48")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for the run (s)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.memory_cap_gib is not None:  # stand-in for a smaller card: allocations beyond it raise OOM
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "zarr": zarr.__version__,
                 "cores": cores, "workers": args.workers, "writer_threads": args.writer_threads,
                 "writer_processes": args.writer_processes, "memory_cap_gib": args.memory_cap_gib,
                 "switch_interval_s": sys.getswitchinterval()}
    tmp = Path(args.dir or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    res["disk_write_GBps_odirect"] = disk_write_gbps(tmp)
    write_tiny_processor(tmp / "proc")
    proc = load_processor(str(tmp / "proc"))
    vlm = release_vlm(proc.tokenizer)
    space = UnicycleAccelCurvature()
    rows = []
    builds = [b.split(":") for b in args.builds.split(",") if b]
    for ci, cams in enumerate((RELEASE_CAMERAS, ("camera_front_wide_120fov",))):
        tag = "4cam" if len(cams) == 4 else "front"
        quants = [q for c, q in builds if c == tag]
        if not quants:
            continue
        cfg = BuildConfig(dataset="-", checkpoint="-", batch_size=4)
        builder = Builder(cfg, proc, vlm, space)
        stage = builder.stage(FakeSamples(cams, 8))
        t0 = time.perf_counter()
        prepared = [stage.prepare(fake_sample(i, cams)) for i in range(8)]
        res[f"{tag}_inputs_cpu_s_per_sample"] = (time.perf_counter() - t0) / len(prepared)
        inputs = [p.inputs for p in prepared]
        L = inputs[0]["prefix_len"]
        res[f"{tag}_prefix_len"] = L
        for B in (1, 4):
            batch = {k: torch.cat([x[k] for x in inputs[:B]]) for k in
                     ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
            torch.cuda.reset_peak_memory_stats()
            t = cuda_time(lambda b=batch, n=L: prefill(vlm, b, n, keep_hidden=True))
            res[f"{tag}_prefill_B{B}_s_per_sample"] = t / B
            res[f"{tag}_prefill_B{B}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        prov = {"checkpoint": None, "head_config_hash": None, "processor": None, "prefix_mode": "teacher",
                "dataset_revision": None, "code_version": "bench"}
        # the writer alone: records of one prefill written again and again (GPU staging + compression + IO)
        spec = KVSpec(36, 8, 128, 4096, "bfloat16", "none", True, "zstd")
        if args.minimal:
            n_w = 0
        else:
            recs = builder.records(prepared[:4])
            writer = StoreWriter.create(str(tmp / f"writer_only_{tag}"), prov, spec, workers=args.writer_threads,
                                        max_pending=args.writer_threads + 4, processes=args.writer_processes)
            writer.wait_ready()
            n_w = 16
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(n_w):
                r = recs[i % 4]
                writer.write(dataclasses.replace(r, key=f"w{i}@{r.t0_us}:{r.camera_config}", clip_id=f"w{i}"))
            writer.close()
            dt = time.perf_counter() - t0
            res[f"{tag}_writer_only_s_per_sample"] = dt / n_w
            res[f"{tag}_writer_only_GBps_logical"] = writer.bytes_logical / dt / 1e9
            del recs
            shutil.rmtree(tmp / f"writer_only_{tag}")
        # the whole build: CPU stage in worker processes -> prefill -> writer, as the CLI runs it
        for quant in quants:
            spec = KVSpec(36, 8, 128, 4096, "bfloat16", quant, True, args.codec)
            url = str(tmp / f"store_{tag}_{quant}")
            wall0 = time.time()
            writer = (StagingOnly if args.writer == "stage-only" else StoreWriter).create(
                url, prov, spec, workers=args.writer_threads,
                processes=0 if args.writer == "stage-only" else args.writer_processes,
                max_pending=(args.writer_processes or args.writer_threads) + 4)
            writer.wait_ready()  # writer processes start in ~2 s; a real build does that while the VLM loads
            n = args.samples
            stage = builder.stage(FakeSamples(cams, n, offset=10_000 * ci))  # same samples in every store
            items = timed(cpu_stage_loader(stage, args.workers))
            torch.cuda.reset_peak_memory_stats()
            tw = TimedWriter(writer)
            waited0 = dict(builder.waited)
            n_done, _ = builder.run(items(), tw)
            writer.close()
            dt = time.perf_counter() - items.t_first
            steady = tw.steady_s_per_sample()
            t1 = time.perf_counter()
            os.sync()
            sync_s = time.perf_counter() - t1
            rows.append({"cams": tag, "quant": quant, "codec": args.codec, "writer": args.writer, "L": L, "samples": n_done, "s_per_sample": dt / n_done,
                         "ratio_to_prefill_B4": dt / n_done / res[f"{tag}_prefill_B4_s_per_sample"],
                         "steady_s_per_sample": steady, "commit_pace_s_per_sample": commit_pace(url),
                         "steady_ratio_to_prefill_B4": steady / res[f"{tag}_prefill_B4_s_per_sample"],
                         "GB_per_s_written": writer.bytes_stored / dt / 1e9,
                         "MB_per_sample_stored": writer.bytes_stored / n_done / 1e6,
                         "MB_per_sample_logical": writer.bytes_logical / n_done / 1e6,
                         "peak_GiB": torch.cuda.max_memory_allocated() / 2**30, "sync_after_s": sync_s,
                         "wall_start": wall0, "wall_end": time.time(),
                         **{f"waited_{k}": builder.waited[k] - waited0[k] for k in waited0}})
            print(rows[-1], flush=True)
        if args.minimal or set(quants) != {"none", "int8", "int4"}:
            for quant in quants:
                shutil.rmtree(tmp / f"store_{tag}_{quant}")
            continue
        # head velocity from int8 / int4 prefixes vs bf16 (release-size head, random weights)
        text = vlm.config.text_config.to_dict()
        with torch.device("cuda"):
            head = AlpamayoHead(HeadConfig.from_alpamayo_config({"expert_cfg": RELEASE_EXPERT_OVERRIDES}, text))
        head = head.to(torch.bfloat16).eval()
        x = torch.randn(1, 64, 2, device="cuda")
        tt = torch.full((1, 1, 1), 0.5, device="cuda")
        vel = {}
        for quant in ("none", "int8", "int4"):
            st = Store.open(str(tmp / f"store_{tag}_{quant}"))
            r = st.read(sorted(st.keys())[0], device="cuda", with_hidden=False)
            with torch.no_grad():
                vel[quant] = head.velocity(x, tt, KVPrefix.collate([(r.k, r.v, r.prefix_len, r.rope_delta)]).to("cuda"))
        for q in ("int8", "int4"):
            res[f"{tag}_velocity_rel_err_{q}_vs_bf16"] = float((vel[q] - vel["none"]).norm() / vel["none"].norm())
        del head
        for quant in ("none", "int8", "int4"):
            shutil.rmtree(tmp / f"store_{tag}_{quant}")
        torch.cuda.empty_cache()
    res["build_rows"] = rows
    if not args.no_rollout:
        rollout_bench(res, vlm, proc, space, tmp, tuple(int(b) for b in args.rollout_sizes.split(",")))
    print(f"device: {res['device']}")
    for k, v in res.items():
        if k != "build_rows":
            print(f"{k:45s} {v:.4f}" if isinstance(v, float) else f"{k:45s} {v}")
    print(f"{'cams':6s} {'quant':5s} {'L':>5s} {'s/sample':>9s} {'x prefill':>9s} {'steady':>7s} {'x prefill':>9s} "
          f"{'GB/s':>6s} {'MB/smp':>8s} {'peak GiB':>8s}")
    for r in rows:
        print(f"{r['cams']:6s} {r['quant']:5s} {r['L']:5d} {r['s_per_sample']:9.3f} {r['ratio_to_prefill_B4']:9.2f} "
              f"{r['steady_s_per_sample']:7.3f} {r['steady_ratio_to_prefill_B4']:9.2f} "
              f"{r['GB_per_s_written']:6.2f} {r['MB_per_sample_stored']:8.1f} {r['peak_GiB']:8.1f}")
    Path(args.json).write_text(json.dumps(res, indent=2))


class Scripted(MaskTrajTokens):
    """The release's mask, and traces of exactly `n` tokens then one more (the release's stop): until
    token n, <|traj_future_start|> and the EOS ids are held back; token n is <|traj_future_start|>.
    Its step counter is a device tensor updated in place, so it also runs inside a captured step."""

    n = 60
    held: list[int] = []

    def __call__(self, input_ids, scores):
        scores = super().__call__(input_ids, scores)
        if not hasattr(self, "calls"):
            self.calls = torch.zeros((), dtype=torch.long, device=scores.device)
            self.idx = torch.tensor(self.held, device=scores.device)
        self.calls.add_(1)
        held = scores.index_select(1, self.idx)
        scores.index_copy_(1, self.idx, torch.where(self.calls < self.n, float("-inf"), held))
        at_n = self.calls == self.n
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.held[0]] = 0.0
        scores.copy_(torch.where(at_n, forced, scores))
        self.calls.copy_(torch.where(self.calls > self.n, 0, self.calls))
        return scores


def rescript(decoder) -> None:
    """Restart the Scripted counter (a captured step's warm-up ran the processors once, eagerly)."""
    for p in decoder.processors:
        if isinstance(p, Scripted) and hasattr(p, "calls"):
            p.calls.zero_()


def rollout_bench(res: dict, vlm, proc, space, tmp: Path, sizes=(1, 8, 16)) -> None:
    """Rollout, 4-camera prompt, 60-token traces. (a) decode alone: transformers generate (the release's
    path) vs the static-cache decoder with CUDA-graph steps (and eager steps at B=8), same seed, tokens
    compared; (b) the build's rollout path: decoder -> the prefix straight from its cache -> the writer."""
    import cache_builder.rollout as rollout
    from shared.qwen_files import alpamayo_token_ids

    ids = alpamayo_token_ids(proc.tokenizer)
    Scripted.held = [ids["traj_future_start"], ids["im_end"], ids["pad"]]
    rollout.MaskTrajTokens = Scripted
    cfg = BuildConfig(dataset="-", checkpoint="-", batch_size=16, mode="rollout")
    builder = Builder(cfg, proc, vlm, space)
    stage = builder.stage(FakeSamples(RELEASE_CAMERAS, 16))
    prepared = [stage.prepare(fake_sample(i, RELEASE_CAMERAS)) for i in range(16)]
    r_inputs = [p.inputs for p in prepared]
    P = r_inputs[0]["input_ids"].shape[1]
    res["rollout_prompt_len"] = P
    for B in sizes:
        batch = {k: torch.cat([x[k] for x in r_inputs[:B]]).cuda() for k in
                 ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
        batch["pixel_values"] = torch.cat([x["pixel_values"] for x in r_inputs[:B]]).cuda().to(torch.bfloat16)
        out = {}

        def gen(b=batch, out=out):
            out["generate"] = rollout.reference_generate(vlm, proc, b, 7, 61, keep_hidden=True).sequences
        res[f"rollout_60tok_B{B}_generate_s_per_sample"] = cuda_time(gen, reps=2, warm=1) / B
        dec = rollout.make_decoder(vlm, proc)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dec(batch, 61, True, 7)  # the first call captures the step
        rescript(dec)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()

        def graphed(b=batch, d=dec, out=out):
            rescript(d)
            out["graphs"] = d(b, 61, True, 7).sequences
        t = cuda_time(graphed, reps=3, warm=0)
        res[f"rollout_60tok_B{B}_graphs_s_per_sample"] = t / B
        res[f"rollout_60tok_B{B}_graphs_capture_s"] = first - t
        res[f"rollout_60tok_B{B}_graphs_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        res[f"rollout_60tok_B{B}_tokens_equal_generate_rows"] = int(
            (out["graphs"] == out["generate"]).all(dim=1).sum())
        diff = (out["graphs"] != out["generate"])[:, P:]
        res[f"rollout_60tok_B{B}_first_token_differing_from_generate"] = [
            int(d.nonzero()[0]) if d.any() else -1 for d in diff]  # per row; -1: none
        assert out["graphs"].shape[1] == P + 61, out["graphs"].shape
        if B == 8:
            dec.graphs = False

            def eager(b=batch, d=dec, out=out):
                rescript(d)
                out["eager"] = d(b, 61, True, 7).sequences
            res[f"rollout_60tok_B{B}_eager_s_per_sample"] = cuda_time(eager, reps=2, warm=0) / B
            res[f"rollout_60tok_B{B}_graphs_equal_eager"] = bool(torch.equal(out["eager"], out["graphs"]))
        del dec
        torch.cuda.empty_cache()
        print({k: v for k, v in res.items() if k.startswith(f"rollout_60tok_B{B}_")}, flush=True)

    spec = KVSpec(36, 8, 128, 4096, "bfloat16", "none", True, "zstd")
    prov = {"checkpoint": None, "head_config_hash": None, "processor": None, "prefix_mode": "rollout",
            "dataset_revision": None, "code_version": "bench"}
    for B in (8, 16):
        builder = Builder(dataclasses.replace(cfg, batch_size=B), proc, vlm, space)
        builder._decoder = rollout.make_decoder(vlm, proc)
        for rep in range(2):  # the first is a warm-up (and captures the step)
            rescript(builder._decoder)
            url = tmp / f"rollout_B{B}_{rep}"
            writer = StoreWriter.create(str(url), prov, spec, workers=8, max_pending=8 + B, processes=8)
            writer.wait_ready()
            group = [dataclasses.replace(p, inputs=dict(p.inputs), sample=dataclasses.replace(p.sample))
                     for p in prepared[:B]]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n, _ = builder.run(group, writer)
            handed = time.perf_counter() - t0
            writer.close()
            dt = time.perf_counter() - t0
            lens = [Store.open(str(url)).manifest(k)["prefix_len"] - P for k in Store.open(str(url)).keys()]
            shutil.rmtree(url)
        assert n == B and set(lens) == {60}, (n, lens)
        res[f"rollout_build_60tok_B{B}_s_per_sample"] = dt / B
        res[f"rollout_build_60tok_B{B}_handed_over_s_per_sample"] = handed / B
        del builder
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
