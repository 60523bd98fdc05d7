"""cache-build at release shapes with random weights (GPU): prefill, build throughput, memory, bytes, rollout.

    python bench/bench_cache_build.py --json $OUT/cache_build.json

Qwen3-VL-8B shapes (text 4096 x 36 layers, 32/8 heads, vocab 155,697; vision depth 27), 16 images of
1080x1920 -> 320x576 (4 cameras x 4 frames) or 4 images (front-only). Prints a table; timings are
medians with CUDA synchronisation. Results and the command are recorded in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder.cache_build import BuildConfig, Builder  # noqa: E402
from cache_builder.vlm import prefill  # noqa: E402
from shared.action_space import UnicycleAccelCurvature  # noqa: E402
from shared.config import RELEASE_EXPERT_OVERRIDES, HeadConfig  # noqa: E402
from shared.head import AlpamayoHead, KVPrefix  # noqa: E402
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


def fake_sample(i: int, cams: tuple[str, ...], rng) -> Sample:
    n = len(cams)
    t = np.arange(-15, 65) * 0.1
    kappa = 0.05 * (t > 0.3)
    yaw = np.cumsum(kappa * 10 * 0.1)
    xyz = np.stack([np.cumsum(10 * 0.1 * np.cos(yaw)), np.cumsum(10 * 0.1 * np.sin(yaw)), 0 * t], -1)
    xyz -= xyz[15]
    rot = np.zeros((80, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = (np.cos(yaw), -np.sin(yaw), np.sin(yaw),
                                                                             np.cos(yaw), 1)
    return Sample(f"clip{i:04d}", 5_100_000, rng.integers(0, 256, (n, 4, 3, 1080, 1920), dtype=np.uint8), cams,
                  np.arange(n), np.zeros((n, 4), np.int64), xyz[:16], rot[:16], xyz[16:], rot[16:],
                  camera_config="full" if n == 4 else "front-only")


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="cache_build_bench.json")
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    write_tiny_processor(tmp / "proc")
    proc = load_processor(str(tmp / "proc"))
    vlm = release_vlm(proc.tokenizer)
    rng = np.random.default_rng(0)
    space = UnicycleAccelCurvature()
    rows = []
    for cams in (RELEASE_CAMERAS, ("camera_front_wide_120fov",)):
        tag = "4cam" if len(cams) == 4 else "front"
        cfg = BuildConfig(dataset="-", checkpoint="-", batch_size=4)
        builder = Builder(cfg, proc, vlm, space)
        samples = [fake_sample(i, cams, rng) for i in range(args.samples)]
        t0 = time.perf_counter()
        inputs = [builder.inputs(s) for s in samples]
        res[f"{tag}_inputs_cpu_s_per_sample"] = (time.perf_counter() - t0) / len(samples)
        L = inputs[0]["prefix_len"]
        res[f"{tag}_prefix_len"] = L
        for B in (1, 4):
            batch = {k: torch.cat([x[k] for x in inputs[:B]]) for k in
                     ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
            torch.cuda.reset_peak_memory_stats()
            t = cuda_time(lambda b=batch, n=L: prefill(vlm, b, n, keep_hidden=True))
            res[f"{tag}_prefill_B{B}_s_per_sample"] = t / B
            res[f"{tag}_prefill_B{B}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        for quant in ("none", "int8", "int4"):
            spec = KVSpec(36, 8, 128, 4096, "bfloat16", quant, True, "zstd")
            url = str(tmp / f"store_{tag}_{quant}")
            prov = {"checkpoint": None, "head_config_hash": None, "processor": None, "prefix_mode": "teacher",
                    "dataset_revision": None, "code_version": "bench"}
            writer = StoreWriter.create(url, prov, spec, workers=8, max_pending=8)
            n = args.samples if quant == "none" else 4
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, n, 4):
                for rec in builder.records(samples[i:i + 4], inputs[i:i + 4]):
                    writer.write(rec)
            writer.close()
            dt = time.perf_counter() - t0
            rows.append({"cams": tag, "quant": quant, "L": L, "samples": n, "s_per_sample": dt / n,
                         "ratio_to_prefill_B4": dt / n / res[f"{tag}_prefill_B4_s_per_sample"],
                         "GB_per_s_written": writer.bytes_stored / dt / 1e9,
                         "MB_per_sample_stored": writer.bytes_stored / n / 1e6,
                         "MB_per_sample_logical": writer.bytes_logical / n / 1e6,
                         "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
        # head velocity from int8 / int4 prefixes vs bf16 (release-size head, random weights)
        text = vlm.config.text_config.to_dict()
        with torch.device("cuda"):
            head = AlpamayoHead(HeadConfig.from_alpamayo_config({"expert_cfg": RELEASE_EXPERT_OVERRIDES}, text))
        head = head.to(torch.bfloat16).eval()
        x = torch.randn(1, 64, 2, device="cuda")
        tt = torch.full((1, 1, 1), 0.5, device="cuda")
        vel = {}
        for quant in ("none", "int8", "int4"):
            r = Store.open(str(tmp / f"store_{tag}_{quant}")).read(0, device="cuda", with_hidden=False)
            with torch.no_grad():
                vel[quant] = head.velocity(x, tt, KVPrefix.collate([(r.k, r.v, r.prefix_len, r.rope_delta)]).to("cuda"))
        for q in ("int8", "int4"):
            res[f"{tag}_velocity_rel_err_{q}_vs_bf16"] = float((vel[q] - vel["none"]).norm() / vel["none"].norm())
        del head
        torch.cuda.empty_cache()
    res["build_rows"] = rows
    # rollout decode: 60 generated tokens forced (no early stop), 4-camera prompt
    from transformers import LogitsProcessorList

    builder.cfg.mode = "rollout"
    samples = [fake_sample(i, RELEASE_CAMERAS, rng) for i in range(16)]
    r_inputs = [builder.inputs(s) for s in samples]
    for B in (1, 8, 16):
        batch = {k: torch.cat([x[k] for x in r_inputs[:B]]).cuda() for k in
                 ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
        batch["pixel_values"] = torch.cat([x["pixel_values"] for x in r_inputs[:B]]).cuda().to(torch.bfloat16)

        def gen(b=batch):
            vlm.generate(**b, do_sample=True, top_p=0.98, temperature=0.6, top_k=None, min_new_tokens=60,
                         max_new_tokens=60, logits_processor=LogitsProcessorList([]))
        t = cuda_time(gen, reps=2, warm=1)
        res[f"rollout_60tok_B{B}_s_per_sample"] = t / B
    print(f"device: {res['device']}")
    for k, v in res.items():
        if k != "build_rows":
            print(f"{k:45s} {v:.4f}" if isinstance(v, float) else f"{k:45s} {v}")
    print(f"{'cams':6s} {'quant':5s} {'L':>5s} {'s/sample':>9s} {'x prefill':>9s} {'GB/s':>6s} {'MB/smp':>8s} {'peak GiB':>8s}")
    for r in rows:
        print(f"{r['cams']:6s} {r['quant']:5s} {r['L']:5d} {r['s_per_sample']:9.3f} {r['ratio_to_prefill_B4']:9.2f} "
              f"{r['GB_per_s_written']:6.2f} {r['MB_per_sample_stored']:8.1f} {r['peak_GiB']:8.1f}")
    Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
