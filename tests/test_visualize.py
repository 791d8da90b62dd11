"""Tests for ad.visualize: panel layout, outline placement, fixed colour scale, example picking."""

import numpy as np
import pytest
from scipy import ndimage

from ad.visualize import GAP, OUTLINE_COLOR, colorize, mask_outline, overlay_panel, pick_examples

H, W = 48, 64


@pytest.fixture
def image() -> np.ndarray:
    """A smooth uint8 RGB test image."""
    yy, xx = np.mgrid[:H, :W]
    return np.stack([xx * 3, yy * 4, np.full((H, W), 90)], axis=-1).astype(np.uint8)


@pytest.fixture
def mask() -> np.ndarray:
    """A blob touching nothing but itself, plus one touching the image border."""
    m = np.zeros((H, W), dtype=bool)
    m[10:25, 20:40] = True
    m[30:H, 0:8] = True
    return m


def overlay_part(panel: np.ndarray) -> np.ndarray:
    """Return the right half (heat map) of an untitled panel."""
    return panel[:H, W + GAP :]


def test_panel_shape_dtype_and_input_half(image, mask):
    amap = np.random.default_rng(0).random((H, W))
    panel = overlay_panel(image, amap, mask, 0.0, 1.0)
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    assert panel.shape[1] == 2 * W + GAP and panel.shape[0] > H  # + colour-scale legend
    np.testing.assert_array_equal(panel[:H, :W], image)


def test_title_adds_strip_on_top(image):
    amap = np.zeros((H, W))
    plain = overlay_panel(image, amap, None, 0.0, 1.0)
    titled = overlay_panel(image, amap, None, 0.0, 1.0, title="score 3.2 | anomalous | crack")
    strip = titled.shape[0] - plain.shape[0]
    assert strip > 0 and titled.shape[1] == plain.shape[1]
    np.testing.assert_array_equal(titled[strip:], plain)
    assert (titled[:strip] > 128).any()  # some text pixels were drawn


def test_outline_exactly_on_mask_boundary(image, mask):
    panel = overlay_panel(image, np.zeros((H, W)), mask, 0.0, 1.0)
    drawn = (overlay_part(panel) == OUTLINE_COLOR).all(axis=-1)
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
    np.testing.assert_array_equal(drawn, boundary)
    assert drawn[10, 20:40].all() and not drawn[15, 30]  # edge drawn, interior not
    assert drawn[H - 1, 0:8].all()  # blob touching the image border is closed there


def test_no_mask_no_outline(image):
    panel = overlay_panel(image, np.zeros((H, W)), None, 0.0, 1.0)
    assert not (overlay_part(panel) == OUTLINE_COLOR).all(axis=-1).any()


def test_mask_outline_thickness_and_empty():
    m = np.zeros((20, 20), dtype=bool)
    m[5:15, 5:15] = True
    assert mask_outline(m).sum() == 36 and mask_outline(m, thickness=2).sum() == 36 + 28
    assert not mask_outline(np.zeros((5, 5), dtype=bool)).any()


def test_colour_scale_is_fixed_not_per_image(image):
    """The same score gets the same colour whatever else is in the map; out-of-range values clip."""
    a = np.full((H, W), 2.0)
    a[0, 0] = 10.0
    b = np.full((H, W), 2.0)
    b[0, 0] = 3.0
    pa = overlay_part(overlay_panel(image, a, None, 0.0, 4.0))
    pb = overlay_part(overlay_panel(image, b, None, 0.0, 4.0))
    np.testing.assert_array_equal(pa[1:], pb[1:])
    np.testing.assert_array_equal(colorize(np.array([[4.0, 99.0]]), 0, 4)[0, 0],
                                  colorize(np.array([[4.0, 99.0]]), 0, 4)[0, 1])
    low, high = colorize(np.array([[0.0, 4.0]]), 0.0, 4.0)[0]
    assert low[2] > low[0] and high[0] > high[2]  # jet: blue at vmin, red at vmax


def test_shape_mismatch_raises(image):
    with pytest.raises(ValueError, match="anomaly_map"):
        overlay_panel(image, np.zeros((H + 1, W)), None, 0.0, 1.0)


def test_grey_image_accepted():
    grey = np.full((H, W), 128, dtype=np.uint8)
    panel = overlay_panel(grey, np.zeros((H, W)), None, 0.0, 1.0)
    assert (panel[:H, :W] == 128).all()


def test_pick_examples_mix_and_determinism():
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0, 1, 0])
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.7, 0.3, 0.95, 0.05, 0.5, 0.3])
    picked = pick_examples(labels, scores, 5)
    np.testing.assert_array_equal(picked, pick_examples(labels, scores, 5))
    assert len(picked) == 5 and len(set(picked.tolist())) == 5
    # top anomalies (6, 1), a miss (3) and false alarms (2, then 5 before 9 on the tie)
    assert set(picked.tolist()) == {6, 1, 3, 2, 5}
    np.testing.assert_array_equal(picked, [6, 1, 3, 2, 5])  # anomalies, then good; by score


def test_pick_examples_edge_cases():
    labels = np.array([1, 1, 1])
    scores = np.array([0.2, 0.9, np.nan])
    np.testing.assert_array_equal(pick_examples(labels, scores, 10), [1, 0, 2])
    assert pick_examples(labels, scores, 0).size == 0
    assert pick_examples(np.zeros(0), np.zeros(0), 4).size == 0
    assert pick_examples(np.zeros(4), np.arange(4.0), 2).tolist() == [3, 2]
    with pytest.raises(ValueError):
        pick_examples(np.zeros(3), np.zeros(4), 2)
