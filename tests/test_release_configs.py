"""The tiny checkpoint and a head-export of it, read as the official code reads them.

Two layers: in this process (transformers 5) the keys transformers 4.57 needs, and, in a small
venv with transformers==4.57.1 (the official pin; `make tf457`, which `make test` runs first),
tests/release_pin/check_release_configs.py with that version's config classes. Without the venv the
second part skips, unless ALPAMAYO_TF457_PYTHON names it (as `make test` does): then it must run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from shared.checkpoint import AlpamayoCheckpoint, export_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "release_pin" / "check_release_configs.py"


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    state = ck.load_head().state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if v.is_floating_point() and not k.startswith("action_space."):
                v.add_(0.5)
    return export_checkpoint(ck, state, tmp_path_factory.mktemp("export") / "ft"), state


def test_files_are_in_the_form_the_release_ships(tiny_checkpoint, exported):
    base = json.loads((tiny_checkpoint.parent / "qwen3vl" / "config.json").read_text())
    text = base["text_config"]
    assert text["rope_scaling"] == {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"}
    assert text["rope_theta"] == 5_000_000
    assert "rope_parameters" not in text and "rope_parameters" not in base["vision_config"]
    for ckpt in (tiny_checkpoint, exported[0]):
        cfg = json.loads((ckpt / "config.json").read_text())
        ttc = cfg["traj_tokenizer_cfg"]
        assert ttc["_recursive_"] is False and ttc["num_bins"] == 3000
        assert ttc["action_space_cfg"]["_target_"].endswith("UnicycleAccelCurvatureActionSpace")
        assert {k: ttc["action_space_cfg"][k] for k in ("accel_mean", "curvature_std", "n_waypoints", "kappa_lambda")} \
            == {k: cfg["action_space_cfg"][k] for k in ("accel_mean", "curvature_std", "n_waypoints", "kappa_lambda")}


def test_current_transformers_reads_the_same_rope(tiny_checkpoint):
    from transformers import Qwen3VLConfig

    cfg = Qwen3VLConfig.from_pretrained(str(tiny_checkpoint.parent / "qwen3vl"))
    rope = getattr(cfg.text_config, "rope_parameters", None) or cfg.text_config.rope_scaling
    assert rope["mrope_section"] == [4, 2, 2] and rope["mrope_interleaved"] is True
    assert float(rope.get("rope_theta", getattr(cfg.text_config, "rope_theta", 0))) == 5e6


def _tf457_python() -> Path | None:
    named = os.environ.get("ALPAMAYO_TF457_PYTHON")
    if named:
        if not Path(named).exists():
            pytest.fail(f"ALPAMAYO_TF457_PYTHON={named} does not exist; run `make tf457`")
        return Path(named)
    default = ROOT / ".venv-tf457" / "bin" / "python"
    return default if default.exists() else None


def test_transformers_4_57_1_reads_both_checkpoints(tiny_checkpoint, exported):
    py = _tf457_python()
    if py is None:
        pytest.skip("no transformers==4.57.1 venv (make tf457); CI runs it through make test")
    out = subprocess.run([str(py), str(SCRIPT), str(tiny_checkpoint), str(exported[0])], capture_output=True,
                         text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["problems"] == [] and out.returncode == 0, (report["problems"], out.stderr[-2000:])
    assert report["transformers"] == "4.57.1"
    base, ft = report["checkpoints"]
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    assert base["head_tensors"] == ft["head_tensors"] == len(ck.head_keys())
    assert base["tensors"] == ft["tensors"] == len(ck.weight_map)
    assert base["rope_scaling"]["mrope_section"] == [4, 2, 2] and base["rope_theta"] == 5_000_000
    # what 4.57 reads from the export's headers is what was exported
    state = exported[1]
    assert ft["head_header"] == {k: list(v.shape) for k, v in state.items()}
