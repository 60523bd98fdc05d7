"""Official Alpamayo-R1 checkpoint directories: open, read the head only, save heads, export.

Layout (HF `nvidia/Alpamayo-R1-10B`): `config.json` (AlpamayoR1Config with hydra sub-configs),
`model-0000k-of-0000N.safetensors`, `model.safetensors.index.json` (`weight_map`: key -> shard).
No tokenizer: the VLM architecture and processor come from `vlm_name_or_path` (a Qwen3-VL repo).

Head-only loads open each shard lazily (`safe_open`) and read only `expert.*`, `action_in_proj.*`,
`action_out_proj.*`, `action_space.*`; `keys_read` records every tensor read, so tests can assert
that no `vlm.*` tensor was touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .action_space import UnicycleAccelCurvature
from .config import HeadConfig
from .head import AlpamayoHead, build_action_space
from .release import BUFFER_KEYS, R1, complete_head_state, release_of

HEAD_PREFIXES = ("expert.", "action_in_proj.", "action_out_proj.", "action_space.")
INDEX_NAME = "model.safetensors.index.json"
HEAD_FILE_FORMAT = "alpamayo-headtune/head/v1"


class CheckpointError(ValueError):
    """A checkpoint directory or head file that cannot be used, with the path and the fix."""


def is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_repo(name_or_path: str | os.PathLike, *, allow_download: bool = False, base: Path | None = None,
                 allow_patterns: list[str] | None = None) -> Path:
    """A local directory, a path relative to `base`, or a hub id (local HF cache; download only if allowed)."""
    p = Path(name_or_path).expanduser()
    for cand in ([p] if p.is_absolute() else [p] + ([base / p] if base is not None else [])):
        if cand.is_dir():
            return cand.resolve()
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{name}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=allow_patterns))
    except Exception as exc:
        if not allow_download:
            raise CheckpointError(
                f"{name}: not a local directory and not in the local Hugging Face cache; "
                "pass --allow-download to fetch it from the hub (needs network and, for gated repos, a token)"
            ) from exc
    return Path(snapshot_download(name, allow_patterns=allow_patterns))


class AlpamayoCheckpoint:
    """An official-format checkpoint directory (read-only)."""

    def __init__(self, path: Path, vlm_base: Path | None = None, allow_download: bool = False):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json; expected an Alpamayo-R1 checkpoint directory")
        self.config: dict = json.loads(cfg_path.read_text())
        try:
            self.release = release_of(self.config)  # R1 or 1.5 (shared.release says what differs)
        except ValueError as exc:
            raise CheckpointError(f"{cfg_path}: {exc}") from None
        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            self.weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX_NAME} nor model.safetensors")
        missing = sorted({f for f in self.weight_map.values() if not (self.path / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.path}: shards listed in the index are missing: {missing}")
        self._vlm_base_arg = vlm_base
        self._allow_download = allow_download
        self.keys_read: set[str] = set()

    @classmethod
    def open(cls, name_or_path: str | os.PathLike, *, vlm_base: str | os.PathLike | None = None,
             allow_download: bool = False) -> AlpamayoCheckpoint:
        path = resolve_repo(name_or_path, allow_download=allow_download, allow_patterns=["*.json", "*.safetensors"])
        return cls(path, Path(vlm_base) if vlm_base else None, allow_download)

    # -- the VLM side (architecture + processor files live in vlm_name_or_path) ----------------------
    @property
    def vlm_base(self) -> Path:
        """Directory with the base Qwen3-VL config.json and processor/tokenizer files."""
        if self._vlm_base_arg is not None:
            return resolve_repo(self._vlm_base_arg)
        name = self.config.get("vlm_name_or_path")
        if not name:
            raise CheckpointError(f"{self.path}/config.json has no vlm_name_or_path; pass --vlm-base")
        try:
            return resolve_repo(name, allow_download=self._allow_download, base=self.path,
                                allow_patterns=["*.json", "*.txt", "*.jinja", "tokenizer*", "*.model"])
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (vlm_name_or_path of {self.path}; or pass --vlm-base DIR)") from exc

    def vlm_config_dict(self) -> dict:
        """The VLM's Qwen3-VL config, with the vocabulary enlarged as the release does (155,697 rows)."""
        cfg = json.loads((self.vlm_base / "config.json").read_text())
        if "vocab_size" in self.config:
            cfg.setdefault("text_config", {})["vocab_size"] = int(self.config["vocab_size"])
        return cfg

    def head_config(self) -> HeadConfig:
        text_cfg = dict(self.vlm_config_dict()["text_config"])
        return HeadConfig.from_alpamayo_config(self.config, text_cfg)

    def identity(self) -> dict:
        """What a cache or head records about the checkpoint it came from."""
        return {
            "path": str(self.path),
            "config_sha256": sha256_file(self.path / "config.json"),
            "head_config_hash": self.head_config().hash(),
            "vlm_name_or_path": self.config.get("vlm_name_or_path"),
        } | ({} if self.release is R1 else {"model_type": self.release.model_type})

    # -- tensors ---------------------------------------------------------------------------------
    def head_keys(self) -> list[str]:
        return sorted(k for k in self.weight_map if is_head_key(k))

    def read_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read exactly `keys` (lazily, shard by shard)."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k not in self.weight_map:
                raise CheckpointError(f"{self.path}: key {k!r} is not in the checkpoint")
            by_file.setdefault(self.weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for fname, ks in by_file.items():
            with safe_open(self.path / fname, "pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
                    self.keys_read.add(k)
        return out

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        keys = self.head_keys()
        if not keys:
            raise CheckpointError(f"{self.path}: no expert/action tensors; is this an Alpamayo-R1 checkpoint?")
        return complete_head_state(self.release, self.head_config(), self.read_tensors(keys))

    def action_space(self) -> UnicycleAccelCurvature:
        """The checkpoint's action space (its 4 normalisation buffers), without the 2.3 B expert."""
        space = build_action_space(self.head_config())
        keys = [f"action_space.{n}" for n in ("accel_mean", "accel_std", "curvature_mean", "curvature_std")]
        state = self.read_tensors([k for k in keys if k in self.weight_map])
        if len(state) < len(keys):  # 1.5: non-persistent, rebuilt from the config
            dtype = self.read_tensors(["action_out_proj.weight"])["action_out_proj.weight"].dtype
            state = complete_head_state(self.release, self.head_config(), state, dtype, keys)
        space.load_state_dict({k.split(".", 1)[1]: v.float() for k, v in state.items()})
        return space

    def load_head(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  attn_implementation: str = "sdpa") -> AlpamayoHead:
        """Build the head and load its 416 (release) tensors; `dtype=None` keeps the stored dtype."""
        state = self.head_state_dict()
        return head_from_state(self.head_config(), state, dtype, device, attn_implementation)


def head_from_state(cfg: HeadConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> AlpamayoHead:
    """Build a head on `device` and load `state` strictly (names and shapes must match the release)."""
    with torch.device("meta"):
        head = AlpamayoHead(cfg, attn_implementation)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"head tensors do not match the architecture: missing={missing[:5]} unexpected={unexpected[:5]} "
            f"shape-mismatch={bad_shape[:5]}"
        )
    # Allocate in the requested dtype (copy_ casts on load), so no fp32 copy of the weights ever exists;
    # the action-space constants stay fp32 for the solvers, whatever the weight dtype.
    head.to(dtype=dtype or state["action_out_proj.weight"].dtype)
    head.action_space.float()
    head.to_empty(device=device)
    head.load_state_dict(state, strict=True)
    # Rotary inverse frequencies are non-persistent buffers: recompute them on the real device.
    with torch.device(device):
        head.expert.rotary_emb = type(head.expert.rotary_emb)(head.expert.config)
    return head


# -- fine-tuned head files -------------------------------------------------------------------------
def save_head(head: AlpamayoHead | dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict,
              dtype: torch.dtype | None = None) -> Path:
    """Write the head's tensors (official names) from CPU copies, with JSON metadata in the header.

    Copying to CPU first avoids writer failures on device tensors (the seed's PytorchStreamWriter error).
    Written to a temporary name and renamed, so a crash never leaves a half file under `path`.
    """
    state = head.state_dict() if isinstance(head, torch.nn.Module) else head
    cpu = {}
    for k, v in state.items():
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and not k.startswith("action_space."):
            t = t.to(dtype)
        cpu[k] = t.contiguous().clone()
    meta = {"format": HEAD_FILE_FORMAT, "metadata": json.dumps(metadata, sort_keys=True, default=str)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(cpu, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _open_head_file(path: Path):
    """safe_open of a head file of this tool (header checked), or CheckpointError naming the path."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such head file")
    try:
        f = safe_open(str(path), "pt")
    except Exception as exc:  # safetensors raises its own error type for a file that is not safetensors
        raise CheckpointError(f"{path}: not a safetensors head file ({exc})") from exc
    header = f.metadata() or {}
    if header.get("format") != HEAD_FILE_FORMAT:
        raise CheckpointError(f"{path}: not a head file of this tool (format={header.get('format')!r})")
    return f, header


def check_head_file(path: str | os.PathLike) -> dict:
    """Refuse anything but a head file of this tool, reading only its header; -> its metadata."""
    _, header = _open_head_file(Path(path))
    return json.loads(header.get("metadata", "{}"))


def load_head_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict with official names, metadata dict)."""
    f, header = _open_head_file(Path(path))
    with f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    bad = sorted(k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:  # a head trained on corrupt data must not pass on silently into evaluation or an export
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN/Inf (e.g. {', '.join(bad[:3])}); "
                              "this head is unusable: retrain or resume from an earlier checkpoint")
    return state, json.loads(header.get("metadata", "{}"))


# -- export a full official checkpoint with a new head ----------------------------------------------
def _overlap(a: Path, b: Path) -> bool:
    """a and b are the same directory, or one lies inside the other (symlinks resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_export_target(base: Path, out: Path) -> None:
    """Refuse an output that would delete or overwrite the base checkpoint (before anything is touched).

    Checked for `out` and for its staging sibling `out.partial`, which is removed if it exists."""
    base = Path(base)
    for target in (out, out.with_name(out.name + ".partial")):
        if _overlap(target, base):
            raise CheckpointError(
                f"--out {out}: {'is' if target.resolve() == base.resolve() else 'overlaps'} the base checkpoint "
                f"{base.resolve()}; write the export to a separate directory"
            )


def export_checkpoint(base: AlpamayoCheckpoint, head_state: dict[str, torch.Tensor], out_dir: str | os.PathLike,
                      overwrite: bool = False) -> Path:
    """A checkpoint directory `AlpamayoR1.from_pretrained` loads: original `vlm.*` shards reused
    (hard-linked where possible), one new shard for the head, the index rewritten.

    Head tensors are cast to the dtype each key has in the base checkpoint; the base's buffers
    (`action_space.*`, Fourier `freqs`) are kept as they are. Everything is checked first and the
    directory is staged next to `out`; an existing `out` (with `overwrite`) goes only once the new
    one is complete. An `out` that is, contains or lies inside the base checkpoint is refused.
    """
    out = Path(out_dir)
    check_export_target(base.path, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; pass --overwrite to replace it")
    base_head = set(base.head_keys())
    # Buffers the base file does not hold (1.5: non-persistent) are not written: same key set as the original.
    head_state = {k: v for k, v in head_state.items() if k in base_head or k not in BUFFER_KEYS}
    missing = sorted(base_head - set(head_state))
    extra = sorted(set(head_state) - base_head)
    if missing or extra:
        raise CheckpointError(f"head does not match the base checkpoint: missing={missing[:5]} extra={extra[:5]}")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copy2(base.path / "config.json", tmp / "config.json")
    new_map: dict[str, str] = {}
    files: dict[str, list[str]] = {}
    for k, f in base.weight_map.items():
        files.setdefault(f, []).append(k)
    for fname, keys in sorted(files.items()):
        vlm_keys = [k for k in keys if not is_head_key(k)]
        if not vlm_keys:
            continue
        if len(vlm_keys) == len(keys):  # vlm-only shard: reuse the file itself
            try:
                os.link(base.path / fname, tmp / fname)
            except OSError:
                shutil.copy2(base.path / fname, tmp / fname)
        else:  # mixed shard: rewrite its vlm tensors unchanged
            with safe_open(base.path / fname, "pt") as f:
                meta = f.metadata()
                save_file({k: f.get_tensor(k) for k in vlm_keys}, str(tmp / fname), metadata=meta)
        new_map.update(dict.fromkeys(vlm_keys, fname))
    keep_from_base = [k for k in base_head if k.startswith("action_space.") or k.endswith(".freqs")]
    base_vals = base.read_tensors(sorted(base_head))
    head_out = {}
    for k in sorted(base_head):
        src = base_vals[k] if k in keep_from_base else head_state[k]
        head_out[k] = src.detach().to("cpu", base_vals[k].dtype).contiguous()
    head_name = "model-head.safetensors"
    save_file(head_out, str(tmp / head_name), metadata={"format": "pt"})
    new_map.update(dict.fromkeys(head_out, head_name))
    total = sum((tmp / f).stat().st_size for f in set(new_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)
    return out
