"""head-export: write a full official checkpoint directory with a fine-tuned head.

    head-export --head runs/demo/head.safetensors --out exports/alpamayo-ft

The original `vlm.*` shards are reused (hard-linked when on the same filesystem), the head goes
into one new shard, and the index is rewritten, so `AlpamayoR1.from_pretrained(out)` (official
code) loads the result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from shared.checkpoint import AlpamayoCheckpoint, CheckpointError, export_checkpoint, load_head_file
from shared.cli import config_from_args, user_errors


@dataclass
class ExportConfig:
    head: str  # fine-tuned head file written by head-train
    out: str  # output checkpoint directory
    checkpoint: str | None = None  # base checkpoint (default: the one the head was trained from)
    overwrite: bool = False  # replace an existing output directory


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(ExportConfig, argv, "head-export", __doc__.split("\n\n")[0], ("head", "out"))
    try:
        state, meta = load_head_file(cfg.head)
        base = cfg.checkpoint or meta.get("base_checkpoint", {}).get("path")
        if not base:
            raise CheckpointError(f"{cfg.head} records no base checkpoint; pass --checkpoint")
        ckpt = AlpamayoCheckpoint.open(base)
        out = export_checkpoint(ckpt, state, Path(cfg.out), overwrite=cfg.overwrite)
    except user_errors() as exc:
        print(f"head-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"head-export: wrote {out} (base {ckpt.path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
