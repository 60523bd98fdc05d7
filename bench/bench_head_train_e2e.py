"""head-train end to end on the GPU box: the official Stage-2 per-sample cost, loader delivery, head-train.

    python bench/bench_head_train_e2e.py --json-dir $OUT --dir /tmp/stores           # GPU box, release shapes
    python bench/bench_head_train_e2e.py --tiny --device cpu --json-dir /tmp/e --dir /tmp/s   # CPU smoke run

Sections (in this order, each result appended to <json-dir>/head_train_e2e.json as measured):
- stage2: what the official Stage-2 recipe pays per sample: a random-weight Qwen3-VL-8B prefill at B=1
  (4 cameras, L = 2,993; front-only, L = 809) plus the transformers expert step at B=1 (bf16, AdamW);
- stores: release-shape stores with random K/V written by the store writer (4-camera int8 and bf16,
  front-only bf16 and int4), and the disk's sequential read rate with the page cache dropped;
- loader: samples/s the loader delivers to the GPU (no training) per worker count and store, with
  and without the RAM tier;
- e2e: the `head-train` CLI itself from each store, its summary (samples/s, loader wait, peak memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_head_train import build_head, free, head_config, record, run_config  # noqa: E402

from head_trainer.data import make_loader  # noqa: E402
from shared.store import KVSpec, StoreWriter, synthetic_sample  # noqa: E402

PROV = {"checkpoint": None, "head_config_hash": None, "processor": None, "prefix_mode": "teacher",
        "dataset_revision": None, "code_version": "bench"}


def stage2(res_path: Path, device, tiny: bool) -> None:
    """Prefill (random-weight VLM) + transformers expert step, both at B=1."""
    cfg = head_config(tiny)
    rec: dict = {"section": "stage2"}
    if not tiny:
        import bench_cache_build as bcb

        from cache_builder.cache_build import BuildConfig, Builder
        from cache_builder.vlm import prefill
        from shared.action_space import UnicycleAccelCurvature
        from shared.qwen_files import load_processor, write_tiny_processor
        from shared.sample import RELEASE_CAMERAS

        write_tiny_processor(res_path.parent / "proc")
        proc = load_processor(str(res_path.parent / "proc"))
        vlm = bcb.release_vlm(proc.tokenizer)
        builder = Builder(BuildConfig(dataset="-", checkpoint="-", batch_size=1), proc, vlm, UnicycleAccelCurvature())
        for cams, tag in ((RELEASE_CAMERAS, "4cam"), (("camera_front_wide_120fov",), "front")):
            stage = builder.stage(bcb.FakeSamples(cams, 1))
            inp = stage.prepare(bcb.fake_sample(0, cams)).inputs
            batch = {k: inp[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
            rec[f"{tag}_prefix_len"] = inp["prefix_len"]
            rec[f"{tag}_prefill_B1_ms"] = 1e3 * bcb.cuda_time(lambda b=batch, n=inp["prefix_len"]: prefill(vlm, b, n, keep_hidden=False))
        del vlm, builder
        free(device)
    head = build_head(cfg, device, torch.bfloat16)
    for tag, L in (("4cam", rec.get("4cam_prefix_len", 40)), ("front", rec.get("front_prefix_len", 12))):
        r = run_config(head, cfg, device, bsz=1, L=L, optimizer="adamw", engine="transformers", warm=2, timed=5)
        rec[f"{tag}_expert_step_B1_ms"] = r["step_ms"]
        rec[f"{tag}_stage2_ms_per_sample"] = rec.get(f"{tag}_prefill_B1_ms", 0.0) + r["step_ms"]
    del head
    free(device)
    record(res_path, rec)


def fake_record(i: int, spec: KVSpec, L: int, device, cams: int):
    """A release-shape sample with random K/V made on the device (the writer quantises there too)."""
    small = synthetic_sample(i, dataclasses.replace(spec, num_layers=1, num_kv_heads=1, head_dim=spec.head_dim),
                             prefix_len=4, n_cam=cams, split="train")
    g = torch.Generator(device=device).manual_seed(i)
    shape = (spec.num_layers, spec.num_kv_heads, L, spec.head_dim)
    k = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
    v = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
    cc = "full" if cams == 4 else "front-only"
    return dataclasses.replace(small, key=f"clip{i:05d}@{small.t0_us}:{cc}", camera_config=cc,
                               clip_id=f"clip{i:05d}", k=k, v=v, prefix_len=L, hidden=None,
                               token_ids=torch.zeros(L, dtype=torch.long))


def build_store(url: str, spec: KVSpec, n: int, L: int, device, cams: int) -> dict:
    t0 = time.perf_counter()
    with StoreWriter.create(url, PROV, spec, mode="overwrite", workers=8, max_pending=12,
                            processes=8 if device.type == "cuda" else 0) as w:
        for i in range(n):
            w.write(fake_record(i, spec, L, device, cams))
    logical, stored = w.bytes_logical, w.bytes_stored  # after close: every sample committed
    return {"url": url, "samples": n, "L": L, "quant": spec.quant, "codec": spec.codec, "build_s": round(time.perf_counter() - t0, 1),
            "MB_per_sample_stored": round(stored / n / 1e6, 1), "MB_per_sample_logical": round(logical / n / 1e6, 1)}


def disk_read_gbps(path: str) -> dict:
    """Read every file of a store once with 16 threads, page cache dropped first when allowed."""
    dropped = False
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        dropped = True
    except OSError:
        pass
    files = [p for p in Path(path).rglob("*") if p.is_file()]

    def read(p: Path) -> int:
        with open(p, "rb") as f:
            return sum(len(b) for b in iter(lambda: f.read(1 << 24), b""))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        n = sum(ex.map(read, files))
    return {"read_GBps": round(n / (time.perf_counter() - t0) / 1e9, 2), "cache_dropped": dropped, "GB": round(n / 1e9, 2)}


def loader_rate(url: str, n: int, workers: int, device, steps: int, bsz: int, ram_gb: float) -> dict:
    t0 = time.perf_counter()
    loader = make_loader(url, list(range(n)), bsz, seed=0, start=0, stop=steps, num_workers=workers,
                         pin_memory=device.type == "cuda", ram_budget_bytes=int(ram_gb * 1e9), device=device,
                         dtype=torch.bfloat16)
    fill = time.perf_counter() - t0
    t1 = None
    for s, micro in enumerate(loader):
        for b in micro:  # the K/V copies into the device slots (deferred until a step reads them)
            b.prepare().release()
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        if s == 1:
            t1 = time.perf_counter()  # from the second batch: worker start-up excluded
    dt = time.perf_counter() - t1
    return {"workers": workers, "ram_gb": ram_gb, "ram_held": len(loader.feeder.ram), "tier_fill_s": round(fill, 1),
            "samples_per_s": round((steps - 2) * bsz / dt, 1), "ms_per_sample": round(1e3 * dt / ((steps - 2) * bsz), 2),
            "loader_wait_s": round(loader.wait_s, 2)}


def head_checkpoint(root: Path, tiny: bool, device) -> Path:
    """An official-layout checkpoint holding only the head (random bf16 weights) at the bench's shapes.

    The tiny checkpoint's config files, with the expert / action projection / VLM text sizes replaced by
    the bench's (release unless --tiny) and one model.safetensors of the head's tensors: head-train reads
    nothing else, and 16 GB of random VLM weights would only cost minutes of writing."""
    from bench_head_train import QWEN3VL_8B_TEXT, TINY_TEXT
    from safetensors.torch import save_file

    from shared.config import RELEASE_EXPERT_OVERRIDES
    from shared.tiny_checkpoint import write_tiny_checkpoint

    done = root / "head_ckpt" / ("tiny.done" if tiny else "release.done")
    if done.is_file():  # an earlier e2e call of this session wrote it
        return Path(done.read_text())
    ckpt = write_tiny_checkpoint(root / "head_ckpt", dtype=torch.bfloat16, num_shards=2)
    alp = json.loads((ckpt / "config.json").read_text())
    alp["expert_cfg"] = ({"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                          "intermediate_size": 96} if tiny else dict(RELEASE_EXPERT_OVERRIDES))
    aip = {"hidden_size": 32, "num_enc_layers": 2} if tiny else {"hidden_size": None}
    alp["action_in_proj_cfg"] = {k: v for k, v in {**alp["action_in_proj_cfg"], **aip}.items() if v is not None}
    (ckpt / "config.json").write_text(json.dumps(alp, indent=2, sort_keys=True) + "\n")
    base = ckpt.parent / "qwen3vl" / "config.json"
    qcfg = json.loads(base.read_text())
    qcfg["text_config"].update({k: v for k, v in (TINY_TEXT if tiny else QWEN3VL_8B_TEXT).items() if k != "vocab_size"})
    base.write_text(json.dumps(qcfg, indent=2) + "\n")
    for f in ckpt.glob("model*.safetensors*"):
        f.unlink()
    head = build_head(head_config(tiny), device, torch.bfloat16)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})
    del head
    free(device)
    done.write_text(str(ckpt))
    return ckpt


def e2e(url: str, out: Path, steps: int, bsz: int, workers: int, extra: list[str], ckpt: Path,
        timeout_s: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "head_trainer.head_train", "--cache", url, "--out", str(out), "--overwrite",
           "--checkpoint", str(ckpt),
           "--steps", str(steps), "--batch-size", str(bsz), "--num-workers", str(workers), "--warmup-steps", "10",
           "--log-every", "50", "--save-every", str(steps), *extra]
    t0 = time.perf_counter()
    try:  # a run past its limit still records what it printed (the next one gets its turn)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
    rec = {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "tail": text[-1500:]}
    summary = out / "summary.json"
    if summary.is_file():
        rec["summary"] = json.loads(summary.read_text())
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json-dir", required=True)
    ap.add_argument("--dir", required=True, help="where stores and runs go (local disk)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sections", default="stage2,stores,loader,e2e")
    ap.add_argument("--workers", default="4,8,14")
    ap.add_argument("--e2e-steps", type=int, default=300)
    ap.add_argument("--e2e-args", default="--preset 24gb", help="extra head-train flags")
    ap.add_argument("--stores", default="4cam_int8,front_bf16,4cam_bf16,front_int4", help="which stores (and e2e runs)")
    ap.add_argument("--max-samples", type=int, default=0, help="cap each store's sample count (0 = the defaults)")
    ap.add_argument("--e2e-timeout", type=float, default=0, help="seconds per head-train run (0 = none)")
    args = ap.parse_args()
    device = torch.device(args.device)
    out, root = Path(args.json_dir), Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    path = out / "head_train_e2e.json"
    sections = args.sections.split(",")
    if "stage2" in sections:
        stage2(path, device, args.tiny)
    layers, heads, hd, (long_l, short_l) = (2, 2, 16, (40, 12)) if args.tiny else (36, 8, 128, (2993, 809))
    stores = {  # name -> (quant, codec, samples, L, cameras)
        "4cam_int8": ("int8", "zstd", 8 if args.tiny else 48, long_l, 4),
        "front_bf16": ("none", "zstd", 8 if args.tiny else 96, short_l, 1),
        "4cam_bf16": ("none", "zstd", 8 if args.tiny else 16, long_l, 4),
        "front_int4": ("int4", "zstd", 8 if args.tiny else 96, short_l, 1),
    }
    chosen = args.stores.split(",")
    for name, (quant, codec, n, L, cams) in stores.items():
        if name not in chosen:
            continue
        n = min(n, args.max_samples) if args.max_samples else n
        url = str(root / name)
        if "stores" in sections:
            spec = KVSpec(layers, heads, hd, 16 if args.tiny else 4096, "bfloat16", quant, False, codec)
            rec = {"section": "store", "name": name, **build_store(url, spec, n, L, device, cams)}
            rec.update(disk_read_gbps(url))
            record(path, rec)
        if "loader" in sections:
            for w in [int(x) for x in args.workers.split(",")]:
                record(path, {"section": "loader", "name": name, **loader_rate(url, n, w, device, 20, 8, 0.0)})
            record(path, {"section": "loader", "name": name, **loader_rate(url, n, max(int(x) for x in args.workers.split(",")),
                                                                          device, 40, 8, 100.0)})
    if "e2e" in sections:
        ckpt = head_checkpoint(root, args.tiny, device)
        for name in [x for x in ("4cam_int8", "front_bf16") if x in chosen]:
            rec = e2e(str(root / name), root / f"run_{name}", args.e2e_steps, 8, 12, args.e2e_args.split(), ckpt,
                      args.e2e_timeout or None)
            record(path, {"section": "e2e", "name": name, **rec})


if __name__ == "__main__":
    main()
