"""Official checkpoint format: tiny generator, head-only loads, head files, export."""

import json

import pytest
import torch
from safetensors import safe_open

from shared.checkpoint import (
    INDEX_NAME,
    AlpamayoCheckpoint,
    CheckpointError,
    export_checkpoint,
    is_head_key,
    load_head_file,
    save_head,
)


def test_tiny_checkpoint_has_the_release_layout(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "alpamayo_r1"
    assert cfg["action_in_proj_cfg"]["_target_"].endswith("PerWaypointActionInProjV2")
    assert cfg["expert_cfg"]["num_key_value_heads"] == 2 and cfg["traj_vocab_size"] == 4000
    index = json.loads((tiny_checkpoint / INDEX_NAME).read_text())["weight_map"]
    assert len(set(index.values())) >= 2
    assert any(k.startswith("vlm.model.visual.") for k in index)
    assert any(k.startswith("vlm.model.language_model.layers.") for k in index)
    assert "vlm.lm_head.weight" in index and "vlm.model.language_model.embed_tokens.weight" in index
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    n_layers = ck.head_config().num_layers
    assert len(ck.head_keys()) == n_layers * 11 + 1 + 10 + 3 + 2 + 4
    with safe_open(tiny_checkpoint / index["vlm.model.language_model.embed_tokens.weight"], "pt") as f:
        rows = f.get_slice("vlm.model.language_model.embed_tokens.weight").get_shape()[0]
    assert rows == cfg["vocab_size"]  # enlarged vocabulary, as the release


def test_head_load_reads_no_vlm_tensor(tiny_checkpoint):
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    head = ck.load_head()
    assert ck.keys_read and all(is_head_key(k) for k in ck.keys_read)
    assert not any(k.startswith("vlm.") for k in ck.keys_read)
    assert ck.keys_read == set(ck.head_keys())
    ref = ck.read_tensors(["expert.layers.0.mlp.down_proj.weight"])["expert.layers.0.mlp.down_proj.weight"]
    assert torch.equal(head.expert.layers[0].mlp.down_proj.weight, ref)


def test_head_load_save_reload_is_bitwise(tiny_checkpoint, tmp_path):
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    head = ck.load_head(dtype=torch.bfloat16)
    path = save_head(head, tmp_path / "head.safetensors", {"note": "x"})
    state, meta = load_head_file(path)
    assert meta == {"note": "x"}
    orig = head.state_dict()
    assert set(state) == set(orig)
    for k, v in orig.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v.cpu()), k
    from shared.checkpoint import head_from_state

    again = head_from_state(ck.head_config(), state).state_dict()
    assert all(torch.equal(again[k], orig[k]) for k in orig)


def test_export_replaces_head_and_keeps_vlm_bytes(tiny_checkpoint, tmp_path):
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    head = ck.load_head()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    out = export_checkpoint(ck, head.state_dict(), tmp_path / "export")
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert sorted(index) == sorted(ck.weight_map)  # every key exactly once (dict keys are unique)
    assert json.loads((out / "config.json").read_text()) == ck.config
    new = AlpamayoCheckpoint.open(out)
    vlm_keys = [k for k in ck.weight_map if not is_head_key(k)]
    a, b = ck.read_tensors(vlm_keys), new.read_tensors(vlm_keys)
    for k in vlm_keys:
        assert a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    got = new.head_state_dict()
    for k, v in head.state_dict().items():
        if k.startswith("action_space.") or k.endswith(".freqs"):
            assert torch.equal(got[k], ck.read_tensors([k])[k]), k  # buffers kept from the base
        else:
            assert torch.equal(got[k], v.to(got[k].dtype)), k
    with pytest.raises(CheckpointError, match="overwrite"):
        export_checkpoint(ck, head.state_dict(), out)


def test_export_refuses_a_mismatched_head(tiny_checkpoint, tmp_path):
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    state = ck.head_state_dict()
    state.pop("action_out_proj.bias")
    with pytest.raises(CheckpointError, match="missing"):
        export_checkpoint(ck, state, tmp_path / "x")


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        AlpamayoCheckpoint.open(tmp_path / "nope")
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        AlpamayoCheckpoint.open(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="expected 'alpamayo_r1'"):
        AlpamayoCheckpoint.open(tmp_path / "c")
    with pytest.raises(CheckpointError, match="allow-download"):
        AlpamayoCheckpoint.open("someone/not-cached-here")


def test_vlm_loads_from_the_vlm_shards_only(tiny_checkpoint):
    from cache_builder.vlm import load_vlm

    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    vlm = load_vlm(ck, torch.float32)
    key = "model.language_model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(vlm.state_dict()[key], ck.read_tensors(["vlm." + key])["vlm." + key])
    assert vlm.config.text_config.vocab_size == ck.config["vocab_size"]


def _tree_digest(root):
    """{relative path: sha256} of every file under root (what 'untouched' means)."""
    from shared.checkpoint import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def base_copy(tiny_checkpoint, tmp_path):
    import shutil

    dst = tmp_path / "work" / "alpamayo"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink", "partial-sibling"])
def test_export_refuses_an_out_overlapping_the_base_and_leaves_it_untouched(base_copy, where):
    base = base_copy
    if where == "partial-sibling":  # out.partial (the staging directory) would be the base
        base = base_copy.with_name("ft.partial")
        base_copy.rename(base)
    ck = AlpamayoCheckpoint.open(base)
    state = ck.load_head().state_dict()
    out = {"same": base, "parent": base.parent, "inside": base / "export", "partial-sibling": base.with_name("ft"),
           "symlink": base.with_name("link")}[where]
    if where == "symlink":
        out.symlink_to(base, target_is_directory=True)
    before = _tree_digest(base.parent)
    with pytest.raises(CheckpointError, match="base checkpoint"):
        export_checkpoint(ck, state, out, overwrite=True)
    assert _tree_digest(base.parent) == before
    assert AlpamayoCheckpoint.open(base).head_state_dict().keys() == state.keys()


def test_head_export_cli_refuses_out_equal_to_checkpoint(base_copy, tmp_path, capsys):
    from head_trainer.head_export import main

    ck = AlpamayoCheckpoint.open(base_copy)
    head = save_head(ck.load_head(), tmp_path / "head.safetensors", {"base_checkpoint": {"path": str(base_copy)}})
    before = _tree_digest(base_copy)
    rc = main(["--head", str(head), "--checkpoint", str(base_copy), "--out", str(base_copy), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("head-export: error:") and "base checkpoint" in err[0]
    assert _tree_digest(base_copy) == before
    # the same head to a separate directory works, and --overwrite replaces that export only
    out = tmp_path / "ft"
    assert main(["--head", str(head), "--out", str(out)]) == 0
    assert main(["--head", str(head), "--out", str(out)]) == 2
    assert main(["--head", str(head), "--out", str(out), "--overwrite"]) == 0
    assert _tree_digest(base_copy) == before and not out.with_name("ft.partial").exists()
