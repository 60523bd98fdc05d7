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
