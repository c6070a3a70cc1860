"""Volume metrics of the X-ray-to-CT evaluation: closed-form PSNR cases, the X2CT conventions, SSIM against
scikit-image (when installed), and LPIPS' reductions and its missing-package error."""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest

from SVDRRLogic import volume_metrics as vm


def _offset_pair(shape=(8, 9, 10), level=0.4, offset=0.05):
    ref = np.full(shape, level)
    return ref + offset, ref


def test_constant_offset_psnr_is_closed_form():
    pred, ref = _offset_pair(offset=0.05)
    expected = 20 * math.log10(1 / 0.05)
    assert vm.psnr_3d(pred, ref) == pytest.approx(expected, abs=1e-9)
    assert vm.psnr_slices(pred, ref) == pytest.approx(expected, abs=1e-9)
    assert vm.psnr_3d(pred * 2, ref * 2, peak=2.0) == pytest.approx(expected, abs=1e-9)


def test_identical_volumes_score_the_cap_not_infinity():
    ref = np.random.default_rng(0).random((8, 8, 8))
    for value in (vm.psnr_3d(ref, ref), vm.psnr_slices(ref, ref), vm.x2ct_psnr_3d(ref, ref),
                  vm.x2ct_psnr_slices(ref, ref)):
        assert value == vm.PSNR_ZERO_MSE_DB
    assert vm.ssim_slices(ref, ref) == pytest.approx(1.0, abs=1e-12)


def test_slice_psnr_skips_identical_slices_but_x2ct_counts_them_at_100_db():
    ref = np.zeros((4, 6, 6))
    pred = ref.copy()
    pred[0] = 0.1                   # one axial slice wrong; every coronal/sagittal slice carries part of it
    axial = 20.0                    # 20 log10(1 / 0.1)
    other = 10 * math.log10(1 / (0.01 / 4))
    assert vm.psnr_slices(pred, ref) == pytest.approx((axial + 2 * other) / 3, abs=1e-9)
    with_100 = (axial + 3 * vm.PSNR_ZERO_MSE_DB) / 4
    assert vm.psnr_slices(pred, ref, identical="x2ct") == pytest.approx((with_100 + 2 * other) / 3, abs=1e-9)
    assert vm.psnr_3d(pred, ref) == pytest.approx(10 * math.log10(1 / (0.01 / 4)), abs=1e-9)
    with pytest.raises(ValueError, match="identical"):
        vm.psnr_slices(pred, ref, identical="ignore")


def test_x2ct_psnr_is_the_unit_psnr_plus_4_29_db():
    # 1000.5 / 2500 and 1100.5 / 2500 truncate unambiguously to 1000 and 1100 on X2CT's integer scale.
    ref = np.full((6, 7, 8), 1000.5 / 2500)
    pred = np.full_like(ref, 1100.5 / 2500)
    unit = vm.psnr_3d(pred, ref)
    assert vm.x2ct_psnr_3d(pred, ref) - unit == pytest.approx(vm.X2CT_OFFSET_DB, abs=1e-9)
    assert vm.x2ct_psnr_slices(pred, ref) - vm.psnr_slices(pred, ref) == pytest.approx(vm.X2CT_OFFSET_DB, abs=1e-9)
    assert vm.X2CT_OFFSET_DB == pytest.approx(4.29, abs=0.005)
    np.testing.assert_array_equal(vm.to_x2ct_scale(np.array([-0.1, 0.99999, 1.5])), [0, 2499, 2500])


def test_random_volumes_x2ct_offset_holds_within_integer_rounding():
    rng = np.random.default_rng(1)
    ref = rng.random((10, 10, 10))
    pred = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
    assert vm.x2ct_psnr_3d(pred, ref) - vm.psnr_3d(pred, ref) == pytest.approx(vm.X2CT_OFFSET_DB, abs=0.01)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        vm.psnr_3d(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="finite"):
        vm.psnr_3d(np.full((4, 4, 4), np.nan), np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="at least 7"):
        vm.ssim_slices(np.zeros((6, 8, 8)), np.zeros((6, 8, 8)))


def test_ssim_matches_scikit_image_per_orientation():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    ref = rng.random((9, 12, 15))
    pred = np.clip(ref * 0.8 + 0.1 + rng.normal(0, 0.1, ref.shape), 0, 1)
    expected = np.mean([metrics.structural_similarity(pred, ref, data_range=1, channel_axis=axis)
                        for axis in range(3)])
    assert vm.ssim_slices(pred, ref) == pytest.approx(expected, abs=1e-6)
    assert vm.ssim_slices(pred.astype(np.float32), ref.astype(np.float32)) == pytest.approx(expected, abs=1e-6)


def test_evaluate_volume_labels_and_clips_the_prediction():
    pred, ref = _offset_pair(level=0.95, offset=0.1)     # pred 1.05 is clipped to 1: error 0.05
    out = vm.evaluate_volume(pred, ref)
    assert set(out) == {"psnr_3d", "psnr_slices", "psnr_3d_x2ct4095", "psnr_slices_x2ct4095", "ssim_slices"}
    assert set(out) <= set(vm.METRIC_LABELS)
    assert out["psnr_3d"] == pytest.approx(20 * math.log10(1 / 0.05), abs=1e-6)


def test_missing_lpips_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    vm.load_lpips.cache_clear()
    vol = np.zeros((8, 8, 8))
    for call in (lambda: vm.lpips_slices(vol, vol), lambda: vm.evaluate_volume(vol, vol, lpips=True)):
        with pytest.raises(vm.LPIPSUnavailable) as info:
            call()
        message = str(info.value)
        assert "svdrr[eval]" in message and "\n" not in message


_FED: list = []   # (shape, min, max) of each batch the stand-in network received


class _FakeLPIPSNet:
    """Stands in for lpips.LPIPS: the mean absolute difference per image, recording what it was fed in _FED."""

    def __init__(self, net, version, verbose):
        assert (net, version) == ("vgg", "0.1")

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, a, b):
        _FED.append((a.shape, float(a.min()), float(a.max())))
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_reductions_with_a_stand_in_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=_FakeLPIPSNet))
    vm.load_lpips.cache_clear()
    try:
        ref = np.zeros((7, 8, 9))
        pred = np.full_like(ref, 0.25)          # every slice differs by 0.5 on LPIPS' [-1, 1] scale
        _FED.clear()
        total = vm.lpips_slices(pred, ref, reduction="sum", batch=3)
        assert total == pytest.approx(0.5 * (7 + 8 + 9) / 3)
        assert vm.lpips_slices(pred, ref, reduction="mean") == pytest.approx(0.5)
        shape, lo, hi = _FED[0]
        assert tuple(shape) == (3, 3, 8, 9) and lo == hi == pytest.approx(-0.5)
        out = vm.evaluate_volume(pred, ref, lpips=True, lpips_reduction="mean")
        assert out["lpips_slices_mean"] == pytest.approx(0.5)
        with pytest.raises(ValueError, match="reduction"):
            vm.lpips_slices(pred, ref, reduction="max")
    finally:
        vm.load_lpips.cache_clear()
