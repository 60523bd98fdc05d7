"""The stand-in VLM: only the mergers change, the checkpoint keeps the release layout; selection; world options."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cache_builder import standin
from shared.checkpoint import AlpamayoCheckpoint
from shared.data import open_dataset, write_synthetic_world
from shared.images import preprocess_images


def test_curvature_targets_are_window_means():
    action = np.zeros((64, 2), np.float32)
    action[:, 1] = np.arange(64)
    np.testing.assert_allclose(standin.curvature_targets(action), [3.5 + 8 * i for i in range(8)])


def test_pretrain_changes_only_the_mergers_and_keeps_the_layout(tiny_checkpoint, tmp_path):
    from cache_builder.vlm import load_vlm

    base = AlpamayoCheckpoint.open(tiny_checkpoint)
    vlm = load_vlm(base, torch.float32, "cpu")
    visual = vlm.model.visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = []
    for i in range(3):  # 2 cameras each; the target is the brightness of the frames
        frames = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=gen) // (i + 1)
        pix, grid = preprocess_images(frames)
        data.append({"pixels": pix.to(torch.bfloat16), "grid": grid, "n_cam": 2,
                     "target": torch.full((standin.N_TARGETS,), float(frames.float().mean() / 128))})
    cfg = standin.PretrainConfig(dataset=str(tmp_path), checkpoint=str(tiny_checkpoint), out=str(tmp_path / "o"),
                                 steps=30, lr=1e-2)
    losses = standin.pretrain_vision(visual, data, cfg)
    assert losses[-1] < 0.5 * losses[0]
    after = visual.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(("merger.", "deepstack_merger_list.")) for k in changed)
    state = {f"vlm.model.visual.{k}": v for k, v in after.items()}
    out = standin.write_checkpoint(base, state, tmp_path / "standin", {"note": standin.STANDIN_NOTE})
    new = AlpamayoCheckpoint.open(out)
    assert new.weight_map == base.weight_map and json.loads((out / "STANDIN.json").read_text())["note"]
    for fname in set(base.weight_map.values()):
        with safe_open(base.path / fname, "pt") as a, safe_open(out / fname, "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for k in a.keys():
                same = torch.equal(a.get_tensor(k), b.get_tensor(k))
                assert same == (k.removeprefix("vlm.model.visual.") not in changed), k
    with pytest.raises(ValueError, match="not in"):
        standin.write_checkpoint(base, {"vlm.nope": torch.zeros(1)}, tmp_path / "bad", {})


def test_straight_dominated_selection_and_world_options(tmp_path):
    kinds = ["straight", "sharp-left", "sharp-right", "gentle-left", "sharp-left", "sharp-right", "straight"]
    truths = write_synthetic_world(tmp_path / "w", n_clips=7, seed=1, cameras=(), kinds=kinds, val_fraction=0.5)
    assert {t.split for t in truths} == {"train", "val"}
    ds = open_dataset(tmp_path / "w")
    train = [t for t in truths if t.split == "train"]
    sel = standin.straight_dominated(str(tmp_path / "w"), "train", sharp_every=2)
    sharp = [t.clip_id for t in train if t.kind.startswith("sharp")]
    assert [c for c in sel if c in sharp] == sharp[::2]
    assert {t.clip_id for t in train if not t.kind.startswith("sharp")} <= set(sel)
    assert all(ds.split_of(c) == "train" for c in sel)
    with pytest.raises(ValueError, match="unknown mix"):
        write_synthetic_world(tmp_path / "x", n_clips=2, cameras=(), mix="nope")


def test_blank_world_has_the_same_clips_and_gray_frames(tmp_path):
    from shared.data import iter_samples

    a = write_synthetic_world(tmp_path / "a", n_clips=1, seed=2, width=64, height=32, duration_s=12.0, fps=10,
                              cameras=("camera_front_wide_120fov",))
    b = write_synthetic_world(tmp_path / "b", n_clips=1, seed=2, width=64, height=32, duration_s=12.0, fps=10,
                              cameras=("camera_front_wide_120fov",), blank=True)
    assert a[0].clip_id == b[0].clip_id
    sa = next(iter(iter_samples(open_dataset(tmp_path / "a"), None, "default", "front-only")))
    sb = next(iter(iter_samples(open_dataset(tmp_path / "b"), None, "default", "front-only")))
    np.testing.assert_array_equal(sa.ego_future_xyz, sb.ego_future_xyz)
    assert sa.images.std() > 20 and np.abs(sb.images.astype(int) - 128).max() <= 2
