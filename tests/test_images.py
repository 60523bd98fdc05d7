"""shared.images against the spec (docs/alpamayo-r1-prompt.md §4) and transformers' own image processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import images as im
from shared.qwen_files import load_processor, write_tiny_processor


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, 3, h, w) uint8: smooth structure plus noise, like camera frames rather than pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 100 * np.sin(xx / 37.0 + c) * np.cos(yy / 23.0) for c in range(3)])
    return np.clip(base[None] + rng.normal(0, 12, (n, 3, h, w)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_processor")
    write_tiny_processor(d)
    return load_processor(str(d))


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((1080, 1920), (320, 576)),  # model card: 1080x1920 -> 320x576
        ((720, 1280), (320, 576)),
        ((1208, 1920), (320, 544)),
        ((100, 100), (416, 416)),  # below min_pixels: scaled up, ceil to 32
        ((320, 576), (320, 576)),  # already in band
    ],
)
def test_smart_resize_release_band(hw, expected):
    assert im.smart_resize(*hw) == expected


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect"):
        im.smart_resize(10, 2100)


def test_normalize_maps_uint8_to_unit_range():
    x = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).reshape(1, 1, 1, 4)
    got = im.normalize(x).flatten().tolist()
    assert got == [-1.0, np.float32(-0.5 / 127.5), np.float32(0.5 / 127.5), 1.0]


def test_patchify_matches_explicit_layout():
    """Rows: 2x2 merge blocks in raster order, then the block's 4 patches; row = (c, t, 16x16)."""
    n, h, w = 2, 64, 96
    pix = torch.arange(n * 3 * h * w, dtype=torch.float32).reshape(n, 3, h, w)
    got = im.patchify(pix)
    rows = []
    for i in range(n):
        for bi in range(h // 32):
            for bj in range(w // 32):
                for mi in range(2):
                    for mj in range(2):
                        y, x = (2 * bi + mi) * 16, (2 * bj + mj) * 16
                        patch = pix[i, :, y : y + 16, x : x + 16]  # (3, 16, 16)
                        rows.append(torch.stack([patch, patch], dim=1).reshape(-1))  # (c, t, 16, 16)
    assert got.shape == (n * (h // 16) * (w // 16), 1536)
    assert torch.equal(got, torch.stack(rows))


def test_patchify_rejects_sides_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        im.patchify(torch.zeros(1, 3, 48, 64))


@pytest.mark.parametrize("hw, grid", [((1080, 1920), (1, 20, 36)), ((1208, 1920), (1, 20, 34))])
def test_preprocess_images_shapes_and_resize_kernel(hw, grid):
    frames = _frames(3, *hw)
    pixel_values, thw = im.preprocess_images(frames)
    assert thw.dtype == torch.int64 and thw.tolist() == [list(grid)] * 3
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (3 * grid[1] * grid[2], 1536)
    assert im.num_image_tokens(thw) == [grid[1] * grid[2] // 4] * 3
    # torch's native uint8 antialias kernel, not a float resize + round: they differ by 1 LSB on many pixels
    size = (grid[1] * 16, grid[2] * 16)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(frames), size=size, mode="bicubic", antialias=True, align_corners=False
    )
    assert torch.equal(pixel_values, im.patchify((resized.float() - 127.5) / 127.5))
    via_float = torch.nn.functional.interpolate(
        torch.from_numpy(frames).float(), size=size, mode="bicubic", antialias=True, align_corners=False
    )
    assert not torch.equal(resized, via_float.clamp(0, 255).round().to(torch.uint8))


def test_preprocess_same_size_is_not_resampled():
    frames = _frames(1, 320, 576)
    pixel_values, _ = im.preprocess_images(frames)
    assert torch.equal(pixel_values, im.patchify((torch.from_numpy(frames).float() - 127.5) / 127.5))


@pytest.mark.parametrize("hw", [(1080, 1920), (720, 1280), (1208, 1920)])
def test_matches_transformers_pil_backend_within_one_lsb(tiny_processor, hw):
    """Transformers' PIL backend (what loads without torchvision) agrees to +-1 LSB on <1 % of values."""
    if tiny_processor.image_processor.backend != "pil":
        pytest.skip("torchvision present: the bitwise test below covers this")
    frames = _frames(4, *hw, seed=1)
    ours, grid = im.preprocess_images(frames)
    ref = tiny_processor.image_processor(images=list(frames), return_tensors="pt")
    assert torch.equal(ref["image_grid_thw"], grid)
    diff = (ref["pixel_values"] - ours).abs()
    assert float(diff.max()) <= 1 / 127.5 + 1e-6
    assert 0 < float((diff > 1e-6).float().mean()) < 0.01


@pytest.mark.parametrize("hw", [(1080, 1920), (1208, 1920)])
def test_bitwise_equal_to_torchvision_backend(tmp_path, hw):
    """Where torchvision is installed (GPU box), the release's processor path must agree bit for bit."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    frames = _frames(4, *hw, seed=2)
    size = im.smart_resize(*hw)
    tv = tvf.resize(
        torch.from_numpy(frames), list(size), interpolation=tvf.InterpolationMode.BICUBIC, antialias=True
    )
    assert torch.equal(tv, im.resize_uint8(torch.from_numpy(frames), size))

    write_tiny_processor(tmp_path)
    processor = load_processor(str(tmp_path))
    assert processor.image_processor.backend == "torchvision"
    ref = processor.image_processor(images=list(torch.from_numpy(frames)), return_tensors="pt")
    ours, grid = im.preprocess_images(frames)
    assert torch.equal(ref["image_grid_thw"], grid)
    assert torch.equal(ref["pixel_values"], ours)


# -- the two official pixel paths against a written-out antialiased bicubic ---------------------------
def _aa_bicubic_weights(n_in: int, n_out: int, a: float = -0.5) -> np.ndarray:
    """(n_out, n_in) resampling matrix of the antialiased bicubic (Keys a = -0.5, support widened by the
    downscale factor, weights normalised per output pixel): what PIL, torch and torchvision compute."""

    def cubic(x):
        x = np.abs(x)
        return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = cubic((j - center + 0.5) / max(scale, 1.0))
        w[i, lo:hi] = k / k.sum()
    return w


def _reference_resize(frames01: np.ndarray, size) -> np.ndarray:
    """(N, 3, H, W) float64 -> (N, 3, h, w), separable: rows then columns."""
    wy = _aa_bicubic_weights(frames01.shape[-2], size[0])
    wx = _aa_bicubic_weights(frames01.shape[-1], size[1])
    return (wy @ frames01) @ wx.T


@pytest.mark.parametrize("hw", [(1080, 1920), (1208, 1920)])
def test_both_pixel_paths_equal_a_written_out_reference(hw):
    frames = _frames(2, *hw, seed=4)
    frames[:, :, 200:400, 300:700] = 255  # hard edges, where bicubic overshoots [0, 255]
    frames[:, :, 400:600, 300:700] = 0
    size = im.smart_resize(*hw)
    ref = _reference_resize(frames.astype(np.float64) / 255.0, size)  # continuous image in [0, 1]
    # Stage-2 training path: float resize of x / 255, no rounding, no clamp, then (y - 0.5) / 0.5
    stage2, grid = im.preprocess_images(frames, pixels="stage2")
    ref_stage2 = torch.from_numpy((ref - 0.5) / 0.5).float()
    np.testing.assert_allclose(stage2.numpy(), im.patchify(ref_stage2).numpy(), rtol=0, atol=2e-5)
    assert float(ref_stage2.max()) > 1.0 or float(ref_stage2.min()) < -1.0  # overshoot is kept, as released
    # inference path: uint8 in, uint8 out (the fixed-point kernel), then (x - 127.5) / 127.5
    inference, grid2 = im.preprocess_images(frames)
    assert torch.equal(grid, grid2)
    # uint8 kernels (PIL's, torch's) run the two passes with a uint8 image between them: width, then height
    wy = _aa_bicubic_weights(hw[0], size[0])
    wx = _aa_bicubic_weights(hw[1], size[1])
    ref_u8 = np.clip(np.round(wy @ np.clip(np.round(frames.astype(np.float64) @ wx.T), 0, 255)), 0, 255)
    got_u8 = np.round(inference.numpy() * 127.5 + 127.5)
    lsb = np.abs(got_u8 - im.patchify(torch.from_numpy(ref_u8).float()).numpy())
    assert lsb.max() <= 1 and (lsb > 0).mean() < 0.02  # fixed-point weights: off by one on a few pixels
    # and the two paths are not the same thing: most values differ
    diff = (stage2 - inference).abs()
    assert float((diff > 1e-6).float().mean()) > 0.5 and float(diff.max()) > 2 / 255


def test_pixel_path_is_validated_and_reaches_the_prompt(tiny_processor):
    with pytest.raises(ValueError, match="pixels='train'"):
        im.preprocess_images(_frames(1, 64, 64), pixels="train")
    from test_prompt import make_sample

    from shared.prompt import build_vlm_inputs

    sample = make_sample(108, 192)
    frames = torch.from_numpy(sample.images).flatten(0, 1)
    for path in im.PIXEL_PATHS:
        x = build_vlm_inputs(tiny_processor, sample, mode="teacher", pixels=path)
        assert torch.equal(x["pixel_values"], im.preprocess_images(frames, pixels=path)[0]), path
    assert not torch.equal(build_vlm_inputs(tiny_processor, sample, mode="teacher")["pixel_values"],
                           build_vlm_inputs(tiny_processor, sample, mode="teacher", pixels="stage2")["pixel_values"])
