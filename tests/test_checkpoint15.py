"""Alpamayo 1.5 checkpoints: release detection, rebuilt non-persistent buffers, bitwise head round trip,
export with exactly the original key set and config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.checkpoint import (
    INDEX_NAME,
    AlpamayoCheckpoint,
    CheckpointError,
    export_checkpoint,
    head_from_state,
    is_head_key,
    load_head_file,
    save_head,
)
from shared.config import RELEASE_ACTION_SPACE
from shared.release import A15, BUFFER_KEYS, R1, config_targets, foreign_targets, release_of
from shared.tiny_checkpoint15 import to_release15_config, write_tiny_checkpoint15


@pytest.fixture(scope="module", params=[False, True], ids=["no-buffers", "with-buffers"])
def ckpt15(request, tmp_path_factory):
    return write_tiny_checkpoint15(tmp_path_factory.mktemp("tiny15"), keep_buffers=request.param)


def test_config_and_keys_have_the_inferred_release_form(ckpt15):
    cfg = json.loads((ckpt15 / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("alpamayo1_5", ["Alpamayo1_5"])
    targets = config_targets(cfg)
    assert targets["action_in_proj_cfg"] == "alpamayo1_5.models.action_in_proj.PerWaypointActionInProjV2"
    assert targets["diffusion_cfg"] == "alpamayo1_5.diffusion.flow_matching.FlowMatching"
    assert targets["hist_traj_tokenizer_cfg"].startswith("alpamayo1_5.models.delta_tokenizer.")
    assert targets["action_out_proj_cfg"] == "torch.nn.Linear" and foreign_targets(cfg, A15) == []
    ck = AlpamayoCheckpoint.open(ckpt15)
    assert ck.release is A15 and ck.identity()["model_type"] == "alpamayo1_5"
    n = ck.head_config().num_layers * 11 + 1 + 10 + 3 + 2 + 4
    has_buffers = BUFFER_KEYS[0] in ck.weight_map
    assert len(ck.head_keys()) == (n if has_buffers else n - 7)


def test_rebuilt_buffers_follow_the_config(ckpt15):
    ck = AlpamayoCheckpoint.open(ckpt15)
    state = ck.head_state_dict()
    ref = torch.tensor([100 ** (k / 9) for k in range(10)], dtype=torch.float64).to(torch.bfloat16)
    for k in BUFFER_KEYS[:3]:  # bf16, as keep_same_dtype leaves them in a bf16 model
        assert state[k].dtype == torch.bfloat16 and torch.equal(state[k][0], ref)
    head = ck.load_head()
    assert torch.equal(head.action_in_proj.sinus[1].freqs[0], ref.float())
    space = ck.action_space()
    for name in ("accel_mean", "accel_std", "curvature_mean", "curvature_std"):
        got = getattr(space, name)
        if BUFFER_KEYS[0] not in ck.weight_map:  # rebuilt: the config value rounded to the stored dtype
            assert torch.equal(getattr(head.action_space, name), got)
            assert got.item() == torch.tensor(RELEASE_ACTION_SPACE[name]).to(torch.bfloat16).item()
            assert math.isclose(got.item(), RELEASE_ACTION_SPACE[name], rel_tol=4e-3)
    assert not any(k.startswith("vlm.") for k in ck.keys_read)


def test_load_save_reload_is_bitwise(ckpt15, tmp_path):
    ck = AlpamayoCheckpoint.open(ckpt15)
    head = ck.load_head()
    path = save_head(head, tmp_path / "head.safetensors", {"release": "1.5"})
    state, meta = load_head_file(path)
    orig = head.state_dict()
    assert meta == {"release": "1.5"} and set(state) == set(orig)
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in orig.items())
    again = head_from_state(ck.head_config(), state).state_dict()
    assert all(torch.equal(again[k], orig[k]) for k in orig)


def test_export_writes_back_the_source_key_set(ckpt15, tmp_path):
    ck = AlpamayoCheckpoint.open(ckpt15)
    head = ck.load_head()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.5)
    out = export_checkpoint(ck, head.state_dict(), tmp_path / "export")
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert set(index) == set(ck.weight_map)
    assert (out / "config.json").read_bytes() == (ckpt15 / "config.json").read_bytes()
    new = AlpamayoCheckpoint.open(out)
    assert new.release is A15
    got = new.load_head().state_dict()
    for k, v in head.state_dict().items():  # weights written in the base's dtype (bf16); the action-space
        # constants stay fp32 on load (head_from_state) and 1.5 rebuilds them from its config either way
        want = v if k.startswith("action_space.") else v.to(torch.bfloat16).to(got[k].dtype)
        assert torch.equal(got[k], want), k
    vlm = [k for k in ck.weight_map if not is_head_key(k)][:20]
    a, b = ck.read_tensors(vlm), new.read_tensors(vlm)
    assert all(torch.equal(a[k], b[k]) for k in vlm)


def test_release_detection_and_conversion(tiny_checkpoint):
    r1 = AlpamayoCheckpoint.open(tiny_checkpoint)
    assert r1.release is R1 and "model_type" not in r1.identity()  # R1 provenance unchanged
    cfg15 = to_release15_config(r1.config)
    assert release_of(cfg15) is A15 and foreign_targets(cfg15, A15) == []
    half = dict(cfg15, diffusion_cfg={"_target_": "alpamayo_r1.diffusion.flow_matching.FlowMatching"})
    assert foreign_targets(half, A15) == ["alpamayo_r1.diffusion.flow_matching.FlowMatching"]
    with pytest.raises(ValueError, match="model_type='alpamayo2'"):
        release_of({"model_type": "alpamayo2"})


def test_unknown_model_type_is_a_checkpoint_error(tiny_checkpoint, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen3_vl")))
    (d / INDEX_NAME).write_text((tiny_checkpoint / INDEX_NAME).read_text())
    with pytest.raises(CheckpointError, match="model_type='qwen3_vl'"):
        AlpamayoCheckpoint(d)
