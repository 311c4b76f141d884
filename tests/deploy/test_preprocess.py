import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from cp_deploy.preprocess import Geometry, PreprocessConfig, postprocess_masks, preprocess_image, to_rgb_uint8


def test_frame_matches_resize_longest_side():
    fr = Geometry.for_image((531, 490), 1024)
    ref = ResizeLongestSide(1024)
    pts = np.array([[10.0, 20.0], [489.0, 530.0]])
    np.testing.assert_allclose(fr.coords_to_input(pts), ref.apply_coords(pts, (531, 490)))
    np.testing.assert_allclose(fr.coords_to_original(fr.coords_to_input(pts)), pts)
    assert fr.input_size == ref.get_preprocess_shape(531, 490, 1024)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((7, 9), np.uint8),
        np.zeros((7, 9, 1), np.uint8),
        np.zeros((7, 9, 4), np.uint8),
        np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000,
        np.ones((7, 9, 3), np.float32),
    ],
)
def test_to_rgb_uint8_shapes(image):
    out = to_rgb_uint8(image)
    assert out.shape == (7, 9, 3) and out.dtype == np.uint8


def test_16bit_uses_its_own_range():
    img = np.array([[1000, 2000]], np.uint16)
    assert to_rgb_uint8(img)[0, :, 0].tolist() == [0, 255]


def test_minmax_and_meanstd_normalization():
    img = np.random.default_rng(0).integers(10, 200, (30, 40, 3), dtype=np.uint8)
    x, fr = preprocess_image(img, PreprocessConfig(image_size=64, normalize="minmax"))
    h, w = fr.input_size
    assert x.shape == (3, 64, 64) and (h, w) == (48, 64)
    assert float(x[:, :h, :w].min()) == 0.0 and float(x[:, :h, :w].max()) == 1.0
    assert float(x[:, h:, :].abs().sum()) == 0.0  # padding bottom/right
    x2, _ = preprocess_image(img, PreprocessConfig(image_size=64))
    assert float(x2[:, h:, :].abs().sum()) == 0.0 and float(x2[:, :h, :w].min()) < 0


def test_postprocess_returns_original_size():
    fr = Geometry.for_image((101, 57), 64)
    out = postprocess_masks(torch.zeros(2, 1, 16, 16), fr)
    assert out.shape == (2, 101, 57)
