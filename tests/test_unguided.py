"""The unguided suffix KV (route removed) equals a full no-route prefill's KV over the same positions (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_builder.unguided import unguided_suffix
from cache_builder.vlm import load_vlm, prefill
from shared import prompt15 as P15
from shared.checkpoint import AlpamayoCheckpoint
from shared.qwen_files import load_processor
from shared.sample import Sample
from shared.store.nav import unguided_kv
from shared.tiny_checkpoint15 import write_tiny_checkpoint15


@pytest.fixture(scope="module")
def tiny15(tmp_path_factory):
    ckpt = AlpamayoCheckpoint.open(write_tiny_checkpoint15(tmp_path_factory.mktemp("tiny15"), dtype=torch.float32))
    return ckpt, load_vlm(ckpt, dtype=torch.float32), load_processor(str(ckpt.vlm_base))


def _sample(cams) -> Sample:
    rng = np.random.default_rng(1)
    t = np.arange(-15, 1) * 0.1
    return Sample(
        clip_id="c", t0_us=5_100_000, images=rng.integers(0, 256, (len(cams), 4, 3, 64, 96), dtype=np.uint8),
        camera_names=tuple(map(str, cams)), camera_indices=np.array(cams), frame_timestamps_us=np.zeros((len(cams), 4)),
        ego_history_xyz=np.stack([9 * t, 0.1 * t**2, 0 * t], 1), ego_history_rot=np.tile(np.eye(3), (16, 1, 1)),
        ego_future_xyz=np.zeros((64, 3)), ego_future_rot=np.tile(np.eye(3), (64, 1, 1)),
    )


@pytest.mark.parametrize("cams", [[1], [0, 1, 2, 6]])
@pytest.mark.parametrize("nav", ["Turn left in 11m", "Turn right in 130m"])
def test_suffix_equals_full_no_route_prefill(tiny15, cams, nav):
    _, vlm, proc = tiny15
    s = _sample(cams)
    g = P15.build_vlm_inputs15(proc, s, mode="teacher", nav_text=nav)
    u = P15.build_vlm_inputs15(proc, s, mode="teacher")
    pg, pu = prefill(vlm, g, g["prefix_len"], keep_hidden=False), prefill(vlm, u, u["prefix_len"], keep_hidden=False)
    assert int(pg.rope_deltas) == int(pu.rope_deltas)  # delta depends on the images only
    r_s, r_e = g["route_span"]
    k, v = unguided_suffix(vlm, g["input_ids"], pg.keys, pg.values, (r_s, r_e), int(pg.rope_deltas))
    L_u = g["prefix_len"] - (r_e - r_s + 1)
    assert L_u == u["prefix_len"] and k.shape == (pu.keys.shape[0], 1, pu.keys.shape[2], L_u - r_s, pu.keys.shape[4])
    torch.testing.assert_close(k, pu.keys[:, :, :, r_s:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, pu.values[:, :, :, r_s:], rtol=1e-5, atol=1e-5)
    # the shared part: guided [0, r_s) is the no-route prefill's [0, r_s)
    torch.testing.assert_close(pg.keys[:, :, :, :r_s], pu.keys[:, :, :, :r_s], rtol=1e-5, atol=1e-5)
    full_k, full_v = unguided_kv(pg.keys[:, 0], pg.values[:, 0], k[:, 0], v[:, 0], r_s)
    torch.testing.assert_close(full_k, pu.keys[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_v, pu.values[:, 0], rtol=1e-5, atol=1e-5)


def test_suffix_needs_a_route(tiny15):
    _, vlm, proc = tiny15
    g = P15.build_vlm_inputs15(proc, _sample([1]), mode="teacher", nav_text="Turn left in 5m")
    L = g["prefix_len"]
    with pytest.raises(ValueError, match="no suffix"):
        unguided_suffix(vlm, g["input_ids"], torch.zeros(2, 1, 2, L, 16), torch.zeros(2, 1, 2, L, 16), (L - 2, L - 1), 0)
