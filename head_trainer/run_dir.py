"""The run directory: one writer at a time, a resume that cannot change the result silently,
checkpoints written atomically and in the background.

    out/.lock                      {"pid", "host", "start"} of the process that owns the directory
    out/config.json                what the run is (train config, base checkpoint, head config, cache)
    out/metrics.jsonl              one record per log / validation step
    out/checkpoints/step_N/        head.safetensors (official names), [ema_head.safetensors],
                                   [adapter.safetensors, ema_adapter.safetensors] (LoRA),
                                   optimizer.safetensors, state.json (written last: step + file sizes)
    out/best/step_N/               head.safetensors, [ema_head.safetensors]; index.json ranks them

A kill at any point leaves either the previous checkpoint or the new one complete under `step_N`
(write to `step_N.partial`, fsync, rename; old ones are renamed to `.deleting` before removal), and a
resume loads only a checkpoint whose files all have the sizes its state.json records. Failpoints
(shared/failpoints.py) sit at each of those moments for bench/fault_injection.py and the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.checkpoint import save_head
from shared.failpoints import armed, failpoint

from .integrity import TrainingStopped

LOCK_NAME = ".lock"
WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a full disk as its own error

# Fields that change how a run is carried out, never what it computes (compared on --resume).
NOT_RESULT_FIELDS = frozenset({
    "cache", "out", "resume", "overwrite", "allow_config_change", "stop_after", "num_workers", "ram_cache_gb",
    "save_every", "keep_last", "keep_best", "log_every", "tensorboard", "wandb", "wandb_project",
    "gpu_memory_budget", "background_save", "preset", "val_ade_items",
    "skip_bad_samples",  # a run that stops on a damaged sample has skipped none: resuming with it is the same run
})


class RunDirError(ValueError):
    """The run directory is in use or would be changed in a way the user did not ask for."""


def _proc_start(pid: int) -> str | None:
    """Start time of `pid` (Linux /proc), so a recycled pid is not taken for the lock's holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _proc_start(pid) in (None, start)


class RunLock:
    """An exclusive lock file on `out`; a holder on this host that has died is replaced."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
                if holder.get("host") == me["host"] and "pid" in holder and not _alive(holder["pid"], holder.get("start")):
                    self.path.unlink(missing_ok=True)  # the holder died without releasing: recover
                    continue
                raise RunDirError(
                    f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"(lock {self.path}); wait for it, or remove the lock if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def clear_run_dir(out: Path) -> None:
    """--overwrite: remove everything but our lock."""
    for p in out.iterdir():
        if p.name != LOCK_NAME:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def has_run(out: Path) -> bool:
    return out.exists() and any(p.name != LOCK_NAME for p in out.iterdir())


def config_diff(stored: dict, new: dict) -> list[str]:
    """'name: old -> new' for every result-altering field that differs."""
    keys = sorted((set(stored) | set(new)) - NOT_RESULT_FIELDS)
    return [f"{k}: {stored.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
            for k in keys if stored.get(k, "<unset>") != new.get(k, "<unset>")]


def check_resume(out: Path, meta: dict, allow_change: bool) -> list[str]:
    """Compare the new run's meta with the stored config.json; refuse result-altering changes."""
    path = out / "config.json"
    if not path.is_file():
        raise RunDirError(f"{out}: no config.json to resume from; start without --resume")
    old = json.loads(path.read_text())
    diff = config_diff(old.get("train_config", {}), meta["train_config"])
    for part in ("base_checkpoint", "head_config"):
        if json.dumps(old.get(part), sort_keys=True, default=str) != json.dumps(meta[part], sort_keys=True, default=str):
            diff.append(f"{part}: differs from the stored run")
    old_cache, new_cache = old.get("cache", {}), meta["cache"]
    for k in ("provenance", "split", "samples", "keys_sha256"):
        if json.dumps(old_cache.get(k), sort_keys=True) != json.dumps(new_cache.get(k), sort_keys=True):
            diff.append(f"cache.{k}: differs from the stored run")
    if diff and not allow_change:
        raise RunDirError("--resume would change the run: " + "; ".join(diff)
                          + " (pass --allow-config-change to accept, or start a new --out)")
    return diff


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint we resume from), so no step repeats;
    a line torn by a kill mid-write (the last one, not JSON) goes too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    write_atomic(path, "".join(x + "\n" for x in keep))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """`path` holds the old text or the new one whatever moment a kill lands (config.json, metrics.jsonl)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def publish_heads(ckpt: Path, out: Path) -> None:
    """Copy the final checkpoint's head files to `out` (each via a tmp name, so never half a file)."""
    for stem in ("head", "ema_head"):
        src = ckpt / f"{stem}.safetensors"
        if src.is_file():
            tmp = out / f"{stem}.safetensors.tmp"
            shutil.copy2(src, tmp)
            os.replace(tmp, out / f"{stem}.safetensors")


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step_*[0-9]") if (p / "state.json").is_file())


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is not a whole checkpoint (a file missing or of another size than state.json records)."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"state.json unreadable ({exc})"
    for name, size in state.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, state.json recorded {size}"
    return None


def latest_checkpoint(out: Path, warn: bool = False) -> Path | None:
    """The newest whole checkpoint; a damaged newer one is passed over (named on stderr with `warn`)."""
    for ckpt in reversed(checkpoint_dirs(out)):
        why = checkpoint_problem(ckpt)
        if why is None:
            return ckpt
        if warn:
            print(f"head-train: note: {ckpt} is not a whole checkpoint ({why}): not loaded, resuming from an "
                  "earlier one", file=sys.stderr)
    return None


def remove_dir(path: Path) -> None:
    """Rename to `<name>.deleting` first (one atomic step), then delete: a kill mid-delete never leaves
    a half directory under a name that is read."""
    if not path.exists():
        return
    gone = path.with_name(path.name + ".deleting")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    failpoint("ckpt_prune", dir=path)
    shutil.rmtree(gone)


def clear_leftovers(folder: Path) -> None:
    """Remove `.partial` / `.deleting` directories a killed writer left behind."""
    for p in list(folder.glob("*.partial")) + list(folder.glob("*.deleting")):
        shutil.rmtree(p, ignore_errors=True)


def cpu_snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies (taken before the next step changes the originals)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


class _FrozenOptimizer:
    """An optimizer state captured at one step, for `save_optimizer` to write later."""

    def __init__(self, opt: torch.optim.Optimizer):
        sd = opt.state_dict()
        if "state" in sd:  # (torchao's CPU-offload optimizer has another layout; save_optimizer refuses it)
            sd = {"state": {pid: {n: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                                  for n, v in st.items()} for pid, st in sd["state"].items()},
                  "param_groups": sd["param_groups"]}
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


class Background:
    """One write at a time on a thread (or inline); an error is raised on the caller's next wait()."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def run(self, fn, *args) -> None:
        self.wait()
        if not self.enabled:
            fn(*args)
            return

        def target():
            try:
                fn(*args)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=target, daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


class CheckpointWriter:
    """Writes checkpoints into `out/checkpoints` on one background thread (or inline).

    The state is copied to host memory when `save` is called (the only part that waits on the
    step); serialisation and disk writes run on the thread. Each checkpoint goes to `step_N.partial`
    and is renamed when complete, so a kill never leaves a half checkpoint under `step_N`.
    """

    def __init__(self, out: Path, keep_last: int, background: bool, save_optimizer):
        self.out, self.keep_last = Path(out), keep_last
        self._save_optimizer = save_optimizer
        self._bg = Background(background)
        self.wait = self._bg.wait
        clear_leftovers(self.out / "checkpoints")

    def save(self, step: int, heads: dict[str, dict[str, torch.Tensor]], opt: torch.optim.Optimizer, meta: dict,
             extra: dict[str, dict[str, torch.Tensor]]) -> Path:
        """heads: file stem -> official-name state ('head', 'ema_head'); extra: stem -> tensors to resume from."""
        self.wait()
        snap = ({k: cpu_snapshot(v) for k, v in heads.items()}, _FrozenOptimizer(opt),
                {k: cpu_snapshot(v) for k, v in extra.items()})
        final = self.out / "checkpoints" / f"step_{step:07d}"
        self._bg.run(self._write, final, step, meta, *snap)
        return final

    def _write(self, final: Path, step: int, meta: dict, heads, opt, extra) -> None:
        tmp = final.with_name(final.name + ".partial")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            writes = [(f"{stem}.safetensors", lambda p, s=state: save_head(s, p, {**meta, "step": step}))
                      for stem, state in heads.items()]
            writes += [(f"{stem}.safetensors", lambda p, t=tensors: save_file(t, str(p))) for stem, tensors in extra.items()]
            writes.append(("optimizer.safetensors", lambda p: self._save_optimizer(opt, p)))
            sizes = {}
            for name, write in writes:
                write(tmp / name)
                failpoint("ckpt_file_write", partial=_half(tmp / name), file=name, step=step)
                _fsync(tmp / name)
                sizes[name] = (tmp / name).stat().st_size
            (tmp / "state.json").write_text(json.dumps({"step": step, "files": sizes}) + "\n")
            _fsync(tmp / "state.json")
            _fsync(tmp)
            failpoint("ckpt_before_rename", dir=tmp, step=step)
            remove_dir(final)
            os.replace(tmp, final)
            _fsync(final.parent)
        except WRITE_ERRORS as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space a half checkpoint took
            prev = latest_checkpoint(self.out)
            last = f"{prev} (step {json.loads((prev / 'state.json').read_text())['step']})" if prev else "none yet"
            raise CheckpointWriteError(f"writing checkpoint {final} failed: {exc}; nothing of it is kept; the last "
                                       f"good checkpoint is {last}: fix the cause (free space), then --resume"
                                       ) from exc
        failpoint("ckpt_after_rename", dir=final, step=step)
        for old in checkpoint_dirs(self.out)[:-self.keep_last]:
            remove_dir(old)


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (disk full, ...); the earlier checkpoints are intact."""


def _half(path: Path) -> tuple[str, bytes] | None:
    """A failpoint's `partial`: the file cut to half its bytes (only read when the point is armed)."""
    return (str(path), path.read_bytes()) if armed("ckpt_file_write") else None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -- best-k by validation loss ---------------------------------------------------------------------
class BestK:
    """The k heads with the lowest validation loss, in out/best/step_N/ (index.json ranks them)."""

    def __init__(self, out: Path, k: int, resumed_step: int = 0, background: bool = False):
        self.dir, self.k = Path(out) / "best", k
        self._bg = Background(background)
        self.wait = self._bg.wait
        index = self.dir / "index.json"
        self.entries: list[dict] = json.loads(index.read_text()) if index.is_file() else []
        # entries from after the resumed checkpoint are recomputed by this run; a directory the index
        # does not list (a kill between its rename and the index update) goes too
        self.entries = [e for e in self.entries if e["step"] <= resumed_step]
        if self.dir.is_dir():
            clear_leftovers(self.dir)
            listed = {f"step_{e['step']:07d}" for e in self.entries}
            for p in self.dir.glob("step_*[0-9]"):
                if p.name not in listed:
                    shutil.rmtree(p, ignore_errors=True)

    def offer(self, step: int, val_loss: float, heads: dict[str, dict[str, torch.Tensor]], meta: dict) -> bool:
        """Keep this head if it ranks among the k best (host copy now, files written in the background)."""
        entry = {"step": step, "val_loss": val_loss}
        ranked = sorted(self.entries + [entry], key=lambda e: (e["val_loss"], e["step"]))
        if self.k < 1 or entry not in ranked[: self.k]:
            return False
        self.wait()
        self.entries = ranked[: self.k]
        snap = {k: cpu_snapshot(v) for k, v in heads.items()}
        self._bg.run(self._write, step, val_loss, snap, meta, [e["step"] for e in ranked[self.k:]], list(self.entries))
        return True

    def _write(self, step, val_loss, heads, meta, drop: list[int], entries: list[dict]) -> None:
        tmp = self.dir / f"step_{step:07d}.partial"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            for stem, state in heads.items():
                save_head(state, tmp / f"{stem}.safetensors", {**meta, "step": step, "val_loss": val_loss})
            remove_dir(self.dir / f"step_{step:07d}")
            os.replace(tmp, self.dir / f"step_{step:07d}")
            failpoint("best_write", step=step)  # renamed, the index not yet updated
            write_atomic(self.dir / "index.json", json.dumps(entries, indent=1) + "\n")
        except WRITE_ERRORS as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"writing the best head of step {step} into {self.dir} failed: {exc}; the "
                                       "checkpoints are intact: fix the cause (free space), then --resume") from exc
        for s in drop:
            shutil.rmtree(self.dir / f"step_{s:07d}", ignore_errors=True)
