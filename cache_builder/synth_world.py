"""synth-world: write a synthetic PhysicalAI-AV world (exact on-disk layout) with planted curves.

    synth-world /tmp/world --clips 20 --seed 0 --width 576 --height 320 --chunks 2
    synth-world /tmp/demo --clips 96 --mix curve-rich --val-fraction 0.3 --duration 12 --fps 10   # demo

Open it like a real download (`shared.data.open_dataset`); `synthetic_truth.json` lists each clip's
kind (straight, gentle-*, sharp-*), curve onset and peak curvature.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shared.data.cameras import resolve_camera_config
from shared.data.synthetic import MIXES, write_synthetic_world


@dataclass
class SynthWorldConfig:
    out_dir: Path  # where the download tree is written
    clips: int = 8  # number of clips
    seed: int = 0  # everything (ids, paths, colours, timestamps) is a function of the seed
    width: int = 576  # video width in pixels (even); 1920 for the real size, 160-192 for tests
    height: int = 320  # video height in pixels (even); 1080 for the real size
    chunks: int = 1  # clips are spread contiguously over this many chunks (ids 0..chunks-1)
    cameras: str = "full"  # camera config or comma list of cameras to render ('none': egomotion only)
    duration: float = 20.0  # clip length [s] (real clips: 20 s)
    ego_hz: float = 100.0  # egomotion rate [Hz] (real: ~100 Hz)
    fps: int = 30  # video frame rate (real: 30; 10 still gives the release's 0.1 s frame spacing)
    mix: str = "default"  # clip kinds: default | straight-dominated | curve-rich (after one clip of each kind)
    val_fraction: float | None = None  # val share of the split column (default: the seed's 10 % hash split)
    blank: bool = False  # uniform gray videos: the same world without pictures (control runs)
    frame_barcode: bool = False  # draw the frame index as a barcode (tests read it back)
    overwrite: bool = False  # replace a non-empty out_dir
    progress: bool = True  # tqdm progress bar over clips

    def validate(self) -> None:
        if self.clips < 1:
            raise ValueError(f"--clips must be >= 1, got {self.clips}")
        if not 1 <= self.chunks <= self.clips:
            raise ValueError(f"--chunks must be in 1..clips ({self.clips}), got {self.chunks}")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ValueError(f"--width/--height must be even and >= 16, got {self.width}x{self.height}")
        if self.duration < 8.0:
            raise ValueError(
                f"--duration must be >= 8 s (1.6 s history + 6.4 s future margins), got {self.duration}"
            )
        if self.ego_hz < 10:
            raise ValueError(f"--ego-hz must be >= 10, got {self.ego_hz}")
        if self.fps < 10:
            raise ValueError(f"--fps must be >= 10 (frames 0.1 s apart are read), got {self.fps}")
        if self.mix not in MIXES:
            raise ValueError(f"--mix {self.mix!r}: use one of {', '.join(MIXES)}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        self.camera_names()
        out = Path(self.out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not self.overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")

    def camera_names(self) -> tuple[str, ...]:
        return () if self.cameras == "none" else resolve_camera_config(self.cameras).cameras


def run(cfg: SynthWorldConfig):
    cfg.validate()
    start = time.perf_counter()
    truths = write_synthetic_world(
        cfg.out_dir,
        n_clips=cfg.clips,
        seed=cfg.seed,
        width=cfg.width,
        height=cfg.height,
        n_chunks=cfg.chunks,
        cameras=cfg.camera_names(),
        duration_s=cfg.duration,
        ego_hz=cfg.ego_hz,
        fps=cfg.fps,
        mix=cfg.mix,
        val_fraction=cfg.val_fraction,
        blank=cfg.blank,
        frame_barcode=cfg.frame_barcode,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
    )
    elapsed = time.perf_counter() - start
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(Counter(t.kind for t in truths).items()))
    val = Counter(t.kind for t in truths if t.split == "val")
    kinds += f"; val: {sum(val.values())} clips, {sum(v for k, v in val.items() if k != 'straight')} curved"
    print(
        f"synth-world: {len(truths)} clips in {cfg.chunks} chunk(s) at {cfg.width}x{cfg.height} -> {cfg.out_dir}"
    )
    print(f"  kinds: {kinds}; {elapsed:.1f} s ({len(truths) / elapsed * 60:.1f} clips/min)")
    return truths


def parse_args(argv: list[str] | None = None) -> SynthWorldConfig:
    p = argparse.ArgumentParser(prog="synth-world", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="output directory (a PhysicalAI-AV-shaped download tree)")
    p.add_argument("--clips", type=int, default=8, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="random seed; the world is a function of it")
    p.add_argument("--width", type=int, default=576, help="video width (even; 1920 = real size)")
    p.add_argument("--height", type=int, default=320, help="video height (even; 1080 = real size)")
    p.add_argument("--chunks", type=int, default=1, help="number of chunks the clips are spread over")
    p.add_argument(
        "--cameras",
        default="full",
        help="'full' (release four), 'front-only', a comma list of cameras, or 'none' (egomotion only)",
    )
    p.add_argument("--duration", type=float, default=20.0, help="clip length in seconds")
    p.add_argument("--ego-hz", type=float, default=100.0, help="egomotion sampling rate in Hz")
    p.add_argument("--fps", type=int, default=30, help="video frame rate (real: 30; >= 10)")
    p.add_argument("--mix", default="default", help=f"clip kind mix: {' | '.join(MIXES)}")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="val share of the split column (default: the seed's 10 %% clip-id hash split)")
    p.add_argument("--blank", action="store_true", help="uniform gray videos (same clips and egomotion)")
    p.add_argument("--frame-barcode", action="store_true", help="draw each frame's index as a barcode")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    a = p.parse_args(argv)
    return SynthWorldConfig(**vars(a))  # flags mirror the config fields one to one


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"synth-world: error: {exc}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
