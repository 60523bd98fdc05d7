"""Where training metrics go: the progress bar, metrics.jsonl, TensorBoard (default), W&B (--wandb).

After a resume from step N, records past N (written after that checkpoint) are dropped from
metrics.jsonl and TensorBoard (purge_step), so no step appears twice; a W&B run resumes by its id
(kept in out/wandb_id).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .run_dir import truncate_metrics


class Logger:
    def __init__(self, out: Path, start: int, bar, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "alpamayo-headtune", config: dict | None = None):
        self.out, self.bar = Path(out), bar
        truncate_metrics(self.out / "metrics.jsonl", start)
        self.file = open(self.out / "metrics.jsonl", "a")
        self.smooth: float | None = None
        self.tb = self.wb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start + 1 if start else None)
        if wandb:
            self.wb = _wandb_run(self.out, wandb_project, config or {})

    def log(self, rec: dict) -> None:
        """rec: {'step': N, name: float, ...}; 'loss' also feeds the bar's smoothed loss."""
        step = rec["step"]
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in rec.items() if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)
        if "loss" in rec:
            self.smooth = rec["loss"] if self.smooth is None else 0.9 * self.smooth + 0.1 * rec["loss"]
        post = {"loss": f"{self.smooth:.4f}"} if self.smooth is not None else {}
        for k, fmt in (("val_loss", ".4f"), ("lr", ".2e"), ("samples_per_s", ".1f")):
            if k in rec:
                post[k.replace("samples_per_s", "samples/s")] = format(rec[k], fmt)
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _wandb_run(out: Path, project: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(out), config=config, name=out.name)
