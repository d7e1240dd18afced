"""Variants, voting and aggregation against hand-computed values (pure NumPy, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from cervscan.config import STUDY_WEIGHTS, VARIANT_NAMES, VotingConfig
from cervscan.pipeline.vote import (adjust_brightness, aggregate_patient, decide, make_variants, segment_region,
                               weighted_score)


def img4() -> np.ndarray:
    """4x4 RGB image with pixel (y, x) = (10*y + x + 1, 100 + 10*y + x, 200 + y)."""
    y, x = np.mgrid[0:4, 0:4]
    return np.stack([10 * y + x + 1, 100 + 10 * y + x, 200 + y], axis=-1).astype(np.uint8)


def mask4(*pixels: tuple[int, int]) -> np.ndarray:
    m = np.zeros((4, 4), np.uint8)
    for y, x in pixels:
        m[y, x] = 1
    return m


# --------------------------------------------------------------------------- segmented crop

def test_segmented_crop_without_margin_blacks_out_non_lesion_pixels():
    img = img4()
    # L-shaped lesion: (1,1), (1,2), (2,1); (2,2) lies inside the box but outside the lesion
    reg = segment_region(img, mask4((1, 1), (1, 2), (2, 1)), VotingConfig(crop_margin=0.0))
    assert not reg.empty
    assert reg.bbox == (1, 1, 3, 3)
    assert reg.lesion_fraction == pytest.approx(3 / 16)
    expected = np.array([
        [[12, 111, 201], [13, 112, 201]],
        [[22, 121, 202], [0, 0, 0]],
    ], np.uint8)
    np.testing.assert_array_equal(reg.image, expected)
    assert reg.image.dtype == np.uint8


def test_segmented_crop_margin_is_a_fraction_of_each_box_side():
    img = img4()
    # vertical lesion (1,2), (2,2): box rows 1..2 (side 2), column 2 (side 1)
    # margin 0.6: rows grow by round(2*0.6)=1, columns by round(1*0.6)=1
    reg = segment_region(img, mask4((1, 2), (2, 2)), VotingConfig(crop_margin=0.6))
    assert reg.bbox == (1, 0, 4, 4)  # x0, y0, x1, y1
    assert reg.image.shape == (4, 3, 3)
    expected = np.zeros((4, 3, 3), np.uint8)
    expected[1, 1] = img[1, 2]
    expected[2, 1] = img[2, 2]
    np.testing.assert_array_equal(reg.image, expected)


def test_segmented_crop_margin_uses_each_sides_own_length():
    img = img4()
    # horizontal lesion (1,1), (1,2): box height 1, width 2; margin 0.3 -> rows +round(0.3)=0, cols +round(0.6)=1
    reg = segment_region(img, mask4((1, 1), (1, 2)), VotingConfig(crop_margin=0.3))
    assert reg.bbox == (0, 1, 4, 2)
    np.testing.assert_array_equal(reg.image, np.array([[[0, 0, 0], img[1, 1], img[1, 2], [0, 0, 0]]], np.uint8))


def test_segmented_crop_margin_is_clipped_at_the_image_border():
    img = img4()
    # lesion in the top-left corner: (0,0), (0,1); box rows 0..0, cols 0..1
    # margin 0.6: rows +-round(0.6)=1 -> [-1, 2) clipped to [0, 2); cols +-round(1.2)=1 -> [0, 3)
    reg = segment_region(img, mask4((0, 0), (0, 1)), VotingConfig(crop_margin=0.6))
    assert reg.bbox == (0, 0, 3, 2)
    expected = np.zeros((2, 3, 3), np.uint8)
    expected[0, 0] = img[0, 0]
    expected[0, 1] = img[0, 1]
    np.testing.assert_array_equal(reg.image, expected)


def test_default_margin_ten_percent_on_a_larger_box():
    img = np.full((40, 40, 3), 50, np.uint8)
    m = np.zeros((40, 40), np.uint8)
    m[10:30, 5:25] = 1  # 20x20 box -> 2 px margin each side
    reg = segment_region(img, m, VotingConfig())
    assert reg.bbox == (3, 8, 27, 32)
    assert reg.image.shape == (24, 24, 3)
    assert reg.image[2:22, 2:22].min() == 50 and reg.image[0].max() == 0


def test_empty_mask_falls_back_to_the_whole_image_and_is_flagged():
    img = img4()
    reg = segment_region(img, np.zeros((4, 4), np.uint8), VotingConfig())
    assert reg.empty and reg.bbox is None and reg.lesion_fraction == 0.0
    np.testing.assert_array_equal(reg.image, img)
    v = make_variants(img, reg.image, VotingConfig())
    # variants 2, 4, 6 repeat the original's view
    np.testing.assert_array_equal(v["segmented"], v["original"])
    np.testing.assert_array_equal(v["segmented_flip"], v["original_flip"])
    np.testing.assert_array_equal(v["segmented_bright"], v["original_bright"])


def test_mask_below_min_lesion_fraction_counts_as_empty():
    img = img4()
    one_px = mask4((2, 2))  # 1/16 = 0.0625
    assert segment_region(img, one_px, VotingConfig(min_lesion_fraction=0.1)).empty
    reg = segment_region(img, one_px, VotingConfig(min_lesion_fraction=0.05, crop_margin=0.0))
    assert not reg.empty and reg.bbox == (2, 2, 3, 3)
    np.testing.assert_array_equal(reg.image, img[2:3, 2:3])


def test_mask_of_other_size_is_refused():
    with pytest.raises(ValueError, match="differ in size"):
        segment_region(img4(), np.ones((3, 4), np.uint8), VotingConfig())


# --------------------------------------------------------------------------- flips and brightness

def test_adjust_brightness_multiplies_rounds_and_clips():
    a = np.array([[[0, 5, 100], [200, 212, 213], [250, 255, 1]]], np.uint8)
    out = adjust_brightness(a, 1.2)
    # 5*1.2=6, 212*1.2=254.4 -> 254, 213*1.2=255.6 -> 255 (clipped), 250*1.2=300 -> 255, 1*1.2 -> 1
    np.testing.assert_array_equal(out, np.array([[[0, 6, 120], [240, 254, 255], [255, 255, 1]]], np.uint8))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(adjust_brightness(a, 0.5), np.array([[[0, 2, 50], [100, 106, 106], [125, 128, 0]]]))


def test_six_variants_by_hand():
    img = img4()
    seg = np.array([[[10, 20, 30], [200, 210, 220]]], np.uint8)  # a 1x2 'segmented' image
    v = make_variants(img, seg, VotingConfig())
    assert list(v) == list(VARIANT_NAMES)
    np.testing.assert_array_equal(v["original"], img)
    np.testing.assert_array_equal(v["segmented"], seg)
    # horizontal flip: column x -> 3 - x
    np.testing.assert_array_equal(v["original_flip"][2, 0], img[2, 3])
    np.testing.assert_array_equal(v["original_flip"][:, 1], img[:, 2])
    np.testing.assert_array_equal(v["segmented_flip"], np.array([[[200, 210, 220], [10, 20, 30]]], np.uint8))
    # brightness from the *unflipped* images by default
    np.testing.assert_array_equal(v["segmented_bright"], np.array([[[12, 24, 36], [240, 252, 255]]], np.uint8))
    np.testing.assert_array_equal(v["original_bright"][0, 0], [1, 120, 240])  # (1, 100, 200) * 1.2
    np.testing.assert_array_equal(v["original_bright"][3, 3], [41, 160, 244])  # (34, 133, 203) * 1.2 = 40.8, 159.6, 243.6
    for arr in v.values():
        assert arr.dtype == np.uint8 and arr.flags["C_CONTIGUOUS"]


def test_brightness_from_flipped_option():
    img = img4()
    seg = np.array([[[10, 20, 30], [200, 210, 220]]], np.uint8)
    v = make_variants(img, seg, VotingConfig(brightness_from_flipped=True))
    np.testing.assert_array_equal(v["segmented_bright"], np.array([[[240, 252, 255], [12, 24, 36]]], np.uint8))
    np.testing.assert_array_equal(v["original_bright"][0, 0], adjust_brightness(img[0, 3:4], 1.2)[0])


def test_only_requested_variants_are_built():
    v = make_variants(img4(), img4(), VotingConfig(variants=("original",)))
    assert list(v) == ["original"]
    v = make_variants(img4(), img4(), VotingConfig(variants=("segmented_bright", "original")))
    assert list(v) == ["original", "segmented_bright"]  # always in v1..v6 order


# --------------------------------------------------------------------------- voting

P = {"original": 0.9, "segmented": 0.8, "original_flip": 0.7, "segmented_flip": 0.6,
     "original_bright": 0.5, "segmented_bright": 0.4}


def test_weighted_score_with_study_weights_is_the_hand_sum():
    # 0.20*0.9 + 0.25*0.8 + 0.15*0.7 + 0.20*0.6 + 0.11*0.5 + 0.09*0.4
    # = 0.18 + 0.20 + 0.105 + 0.12 + 0.055 + 0.036 = 0.696
    assert STUDY_WEIGHTS == (0.20, 0.25, 0.15, 0.20, 0.11, 0.09)
    assert weighted_score(P, VotingConfig()) == pytest.approx(0.696, abs=1e-12)


def test_weights_are_renormalised_over_the_variants_in_use():
    only_orig = VotingConfig(variants=("original",))
    assert only_orig.active_weights() == {"original": 1.0}
    assert weighted_score(P, only_orig) == pytest.approx(0.9, abs=1e-12)
    two = VotingConfig(variants=("original", "segmented"))
    w = two.active_weights()
    assert w["original"] == pytest.approx(0.20 / 0.45) and w["segmented"] == pytest.approx(0.25 / 0.45)
    # (0.2*0.9 + 0.25*0.8) / 0.45 = 0.38 / 0.45
    assert weighted_score(P, two) == pytest.approx(0.38 / 0.45, abs=1e-12)


def test_custom_weights_are_renormalised():
    cfg = VotingConfig(weights=(1, 1, 1, 1, 0, 0))
    # (0.9 + 0.8 + 0.7 + 0.6) / 4
    assert weighted_score(P, cfg) == pytest.approx(0.75, abs=1e-12)
    assert sum(cfg.active_weights().values()) == pytest.approx(1.0)


def test_weighted_score_needs_every_active_variant():
    with pytest.raises(ValueError, match="segmented_bright"):
        weighted_score({k: v for k, v in P.items() if k != "segmented_bright"}, VotingConfig())
    # unused variants may be missing
    assert weighted_score({"original": 0.3}, VotingConfig(variants=("original",))) == pytest.approx(0.3)


# --------------------------------------------------------------------------- decisions and patients

def test_threshold_is_strictly_greater():
    assert decide(0.5, 0.5) == "mildly_normal"
    assert decide(np.nextafter(0.5, 1.0), 0.5) == "severe"
    assert decide(0.49, 0.5) == "mildly_normal"
    assert decide(0.0, 0.0) == "mildly_normal" and decide(1.0, 1.0) == "mildly_normal"


def test_patient_score_is_the_mean_of_its_image_scores():
    score, dec = aggregate_patient([0.25, 0.5, 0.75], 0.5)
    assert score == 0.5 and dec == "mildly_normal"  # mean exactly at the threshold (binary-exact values)
    score, dec = aggregate_patient([0.2, 0.6, 0.73], 0.5)
    assert score == pytest.approx(0.51) and dec == "severe"
    # each image weighs the same: one high image does not dominate
    score, dec = aggregate_patient([0.95, 0.1, 0.1, 0.1], 0.4)
    assert score == pytest.approx(0.3125) and dec == "mildly_normal"


def test_failed_images_are_left_out_of_the_patient_mean():
    score, dec = aggregate_patient([0.8, None, float("nan"), 0.6], 0.5)
    assert score == pytest.approx(0.7) and dec == "severe"


def test_patient_without_usable_images_is_an_error():
    assert aggregate_patient([], 0.5) == (None, "error")
    assert aggregate_patient([None, float("nan")], 0.5) == (None, "error")
