"""The stand-in VLM: road-map units, the read-out written into the merged tokens, the release layout; selection; world options."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cache_builder import standin
from shared.checkpoint import AlpamayoCheckpoint
from shared.data import open_dataset, write_synthetic_world
from shared.images import preprocess_images
from shared.sample import FRONT_CAMERA as FRONT


def test_curvature_targets_are_window_means():
    action = np.zeros((64, 2), np.float32)
    action[:, 1] = np.arange(64)
    np.testing.assert_allclose(standin.curvature_targets(action), [15.5 + 32 * i for i in range(standin.N_TARGETS)])


def _scene(road_cols: slice, h: int = 64, w: int = 96) -> torch.Tensor:
    """(3, h, w) uint8: grass, with asphalt in the bottom half over `road_cols` (in 1/6ths of the width)."""
    img = torch.tensor([70, 120, 50], dtype=torch.uint8).view(3, 1, 1).repeat(1, h, w)
    c0, c1 = (road_cols.start * w) // 6, (road_cols.stop * w) // 6
    img[:, h // 2:, c0:c1] = torch.tensor([85, 85, 90], dtype=torch.uint8).view(3, 1, 1)
    return img


def test_road_map_units_fire_where_the_road_is(tiny_checkpoint):
    from cache_builder.vlm import load_vlm

    visual = load_vlm(AlpamayoCheckpoint.open(tiny_checkpoint), torch.float32, "cpu").model.visual
    standin.set_road_features(visual)
    pix, grid = preprocess_images(torch.stack([_scene(slice(0, 3)), _scene(slice(3, 6))]))
    u = standin.road_units(visual, {"pixels": pix, "grid": grid, "n_img": 2}).view(2, -1, standin.COLS)
    half = standin.COLS // 2  # road on the left half of image 0, the right half of image 1
    lower = u[:, 1:]  # road rows (below the first cut); units are LayerNorm-scaled means, so small
    assert (lower[0, :, :half] - lower[1, :, :half] > 0.002).all()
    assert (lower[1, :, half:] - lower[0, :, half:] > 0.002).all()


def test_readouts_are_written_into_the_merged_tokens_and_only_vision_keys_change(tiny_checkpoint, tmp_path):
    from cache_builder.cache_inspect import ridge_fit
    from cache_builder.vlm import load_vlm

    base = AlpamayoCheckpoint.open(tiny_checkpoint)
    visual = load_vlm(base, torch.float32, "cpu").model.visual
    standin.set_road_features(visual)
    data = []
    for cols in (slice(0, 2), slice(1, 4), slice(2, 5), slice(4, 6), slice(0, 6), slice(3, 5)):
        pix, grid = preprocess_images(torch.stack([_scene(cols), _scene(cols)]))
        data.append({"pixels": pix, "grid": grid, "n_img": 2, "cameras": ("camera_cross_left_120fov", FRONT),
                     "target": torch.tensor([float(cols.start + cols.stop) - 5.0, float(cols.stop - cols.start)])})
    cfg = standin.PretrainConfig(dataset=str(tmp_path), checkpoint=str(tiny_checkpoint), out=str(tmp_path / "o"),
                                 alpha=0.1)
    assert standin.fit_readout(visual, data, cfg)["images"] == 2 * len(data)
    # reference: a ridge on the front images' mean road maps (map 0) and one on the cross-left images' (map 1),
    # each applied to every image
    x = torch.cat([standin.road_units(visual, d) for d in data]).double().numpy()
    y = np.concatenate([[d["target"].numpy()] * 2 for d in data])
    front = np.array([c == FRONT for d in data for c in d["cameras"]])
    want = []
    for rows in (front, ~front):
        w, b, mu, sd = ridge_fit(x[rows], y[rows], 0.1)
        want.append(standin.READ_SCALE * standin.GAIN * ((x - mu) / sd @ w + b))
    want = np.concatenate(want, 1)  # (images, N_READ): map m, target j at m * N_TARGETS + j
    with torch.no_grad():
        got = torch.cat([visual(d["pixels"].float(), grid_thw=d["grid"], return_dict=True).pooler_output
                         .view(2, -1, visual.merger.linear_fc2.out_features).mean(1) for d in data])
    for k in range(standin.N_READ):  # the merger's LayerNorm rescales (~1/1.6): affine, not equal
        assert np.corrcoef(got[:, standin.PRED.start + k].numpy(), want[:, k])[0, 1] > 0.99
        slope = np.polyfit(want[:, k], got[:, standin.PRED.start + k].numpy(), 1)[0]
        assert 0.3 < slope < 1.0
    state = {f"vlm.model.visual.{k}": v for k, v in visual.state_dict().items()}
    out = standin.write_checkpoint(base, state, tmp_path / "standin", {"note": standin.STANDIN_NOTE})
    new = AlpamayoCheckpoint.open(out)
    assert new.weight_map == base.weight_map and json.loads((out / "STANDIN.json").read_text())["note"]
    for fname in set(base.weight_map.values()):
        with safe_open(base.path / fname, "pt") as a, safe_open(out / fname, "pt") as bb:
            assert set(a.keys()) == set(bb.keys())
            for k in a.keys():
                if not k.startswith("vlm.model.visual."):
                    assert torch.equal(a.get_tensor(k), bb.get_tensor(k)), k
    with pytest.raises(ValueError, match="not in"):
        standin.write_checkpoint(base, {"vlm.nope": torch.zeros(1)}, tmp_path / "bad", {})
    with pytest.raises(ValueError, match="no side-camera images"):
        standin.fit_readout(visual, [dict(d, n_img=1, cameras=(FRONT,), pixels=d["pixels"][: len(d["pixels"]) // 2],
                                          grid=d["grid"][:1]) for d in data], cfg)


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


def test_value_readout_writes_the_pred_channels_into_every_kv_heads_first_dims(tiny_checkpoint):
    from cache_builder.vlm import load_vlm

    lm = load_vlm(AlpamayoCheckpoint.open(tiny_checkpoint), torch.float32, "cpu").model.language_model
    before = [layer.self_attn.v_proj.weight.clone() for layer in lm.layers]
    emb = lm.embed_tokens.weight.clone()
    standin.set_value_readout(lm, gain=3.0, front_gain=0.5)
    gains = torch.tensor([0.5 if m == "front" else 3.0 for m in standin.MAPS for _ in range(standin.N_TARGETS)])
    assert (lm.embed_tokens.weight[:, standin.PRED] == 0).all()
    assert torch.equal(lm.embed_tokens.weight[:, standin.PRED.stop:], emb[:, standin.PRED.stop:])
    x = torch.randn(5, lm.config.hidden_size)
    for layer, w0 in zip(lm.layers, before):
        attn = layer.self_attn
        d, n_kv = attn.head_dim, lm.config.num_key_value_heads
        with torch.no_grad():
            v = attn.v_proj(x).view(5, n_kv, d)  # (tokens, kv_heads, head_dim)
            v0 = torch.nn.functional.linear(x, w0).view(5, n_kv, d)
        for h in range(n_kv):
            torch.testing.assert_close(v[:, h, :standin.N_READ], gains * x[:, standin.PRED], rtol=0, atol=1e-6)
            torch.testing.assert_close(v[:, h, standin.N_READ:], v0[:, h, standin.N_READ:], rtol=0, atol=0)
