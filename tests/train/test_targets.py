import numpy as np
import pytest

from cp_train.targets import edge_points, hflip_points, mask_instances, vflip_points


def _rect(h=60, w=50, x0=10, y0=30, x1=20, y1=40):
    m = np.zeros((h, w), bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def test_rectangle_by_hand():
    (inst,) = mask_instances(_rect())
    np.testing.assert_array_equal(inst.box, [10, 30, 20, 40])
    # centroid (15, 35); k*45 degrees counter-clockwise from +x, y pointing down on screen
    expected = [(20, 35), (20, 30), (15, 30), (10, 30), (10, 35), (10, 40), (15, 40), (20, 40)]
    np.testing.assert_array_equal(inst.points, expected)


def test_diamond_by_hand():
    m = np.zeros((41, 41), bool)
    yy, xx = np.mgrid[:41, :41]
    m[np.abs(xx - 20) + np.abs(yy - 20) <= 10] = True
    p = edge_points(m)
    np.testing.assert_array_equal(p[[0, 2, 4, 6]], [(30, 20), (20, 10), (10, 20), (20, 30)])
    np.testing.assert_array_equal(p[1], (25, 15))  # the 45-degree ray meets the edge x+y... midway


def test_holes_filled_and_specks_dropped():
    m = _rect(x0=5, y0=5, x1=25, y1=25)
    m[10:20, 10:20] = False  # a hole
    m[50, 40] = True  # a 1-px speck
    m[40:50, 5:15] = True  # a second instance
    insts = mask_instances(m, min_area=16)
    assert len(insts) == 2
    assert insts[0].mask.sum() == 21 * 21  # hole filled
    np.testing.assert_array_equal(insts[1].box, [5, 40, 14, 49])


@pytest.mark.parametrize("flip", ["h", "v"])
def test_flip_swaps(flip):
    rng = np.random.default_rng(0)
    m = np.zeros((64, 80), bool)
    yy, xx = np.mgrid[:64, :80]
    m[((xx - 37) / 17.0) ** 2 + ((yy - 29) / 11.0) ** 2 <= 1] = True
    m[rng.integers(0, 64, 3), rng.integers(0, 80, 3)] = False  # break the symmetry a little
    p = edge_points(m)
    if flip == "h":
        np.testing.assert_allclose(edge_points(m[:, ::-1]), hflip_points(p, 80), atol=1.0)
    else:
        np.testing.assert_allclose(edge_points(m[::-1]), vflip_points(p, 64), atol=1.0)
