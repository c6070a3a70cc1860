"""SV-DRR parity: our ``svdrr-lidc`` DRRs with the ``diffdrr`` HU model against the LIDC-IDRI-DRR pipeline itself.

The reference is rendered exactly as SV-DRR's ``scripts/create_drr_img.py`` does (DiffDRR, volume read with
``orientation="PA"`` and centred, ``DRR(sdd=1800, renderer="trilinear")``, pose ZXY Euler ``[phi, theta, 0]`` in
radians with translation ``[0, -1650, 0]``), on a reduced detector with the same 358.4 mm field of view, and
compared after per-image min-max (their PNGs are ``plt.imsave`` of the raw image, row 0 at the top) with ours from
``CArmGeometry.preset("svdrr-lidc").with_view(*from_svdrr_angles(theta, phi))``. This pins
:func:`SVDRRLogic.geometry.from_svdrr_angles` and :func:`SVDRRLogic.attenuation.hu_to_mu` ('diffdrr').
At the full 512 px of 0.7 mm the same views give r >= 0.99997.
"""
from pathlib import Path

import numpy as np
import pytest

from SVDRRLogic.geometry import CArmGeometry, from_svdrr_angles
from SVDRRLogic.renderer import DRRRenderer

CT_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc0001_2p5mm.nii.gz"
VIEWS = [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5), (-0.4, -0.8)]  # SV-DRR (theta, phi), radians
PIXELS, FIELD_MM = 128, 358.4


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


@pytest.fixture(scope="module")
def authors_drr():
    """The authors' renderer for the real CT, on a 128 px detector of 2.8 mm (their field of view)."""
    if not CT_PATH.exists():
        pytest.skip(f"real CT not found at {CT_PATH} (shared data folder absent)")
    pytest.importorskip("diffdrr.drr", reason="DiffDRR is not installed (pip install --no-deps diffdrr==0.6.1)")
    import torch
    from diffdrr.data import read
    from diffdrr.drr import DRR

    subject = read(str(CT_PATH), orientation="PA")
    drr = DRR(subject, sdd=1800.0, height=PIXELS, delx=FIELD_MM / PIXELS, renderer="trilinear")

    def render(theta: float, phi: float) -> np.ndarray:
        rotations = torch.tensor([[phi, theta, 0.0]])  # the script swaps its stored (theta, phi)
        translations = torch.tensor([[0.0, -1650.0, 0.0]])
        with torch.no_grad():
            img = drr(rotations, translations, parameterization="euler_angles", convention="ZXY")
        return img[0, 0].numpy()

    return render


@pytest.fixture(scope="module")
def our_renderer():
    if not CT_PATH.exists():
        pytest.skip(f"real CT not found at {CT_PATH} (shared data folder absent)")
    from SVDRRLogic import load_ct

    ct = load_ct(CT_PATH)
    base = CArmGeometry.preset("svdrr-lidc", isocenter=ct.center_ras, detector=(PIXELS, PIXELS),
                               pixel=(FIELD_MM / PIXELS,) * 2)
    return DRRRenderer(ct, device="cpu", hu_model="diffdrr"), base


@pytest.mark.parametrize("theta,phi", VIEWS)
def test_matches_authors_pipeline(authors_drr, our_renderer, theta, phi):
    renderer, base = our_renderer
    theirs = minmax(authors_drr(theta, phi))
    ours = renderer.render(base.with_view(*from_svdrr_angles(theta, phi)), output="display")
    r = pearson(theirs, ours)
    assert r >= 0.99, f"(theta, phi) = ({theta}, {phi}): r = {r:.5f}"
    # no flip or transpose hides behind a symmetric-looking chest: the unflipped image must be clearly best
    for name, other in {"left-right": ours[:, ::-1], "up-down": ours[::-1], "transpose": ours.T}.items():
        assert pearson(theirs, other) < r - 0.02, f"{name} flip matches as well as the image itself"


def test_angle_mapping_is_pinned():
    """SV-DRR's (theta, phi) -> our (azimuth, elevation): phi is the azimuth, theta the elevation, in degrees."""
    assert from_svdrr_angles(0.0, 0.0) == (0.0, 0.0)
    az, el = from_svdrr_angles(0.3, -0.8)
    assert az == pytest.approx(np.degrees(-0.8)) and el == pytest.approx(np.degrees(0.3))
    az, el = from_svdrr_angles(0.785, 5.473)  # stored phi in [0, 2 pi): wrapped to (-180, 180]
    assert az == pytest.approx(np.degrees(5.473) - 360.0) and el == pytest.approx(np.degrees(0.785))
    assert from_svdrr_angles(0.0, np.pi)[0] == pytest.approx(180.0)
    assert from_svdrr_angles(0.0, -np.pi)[0] == pytest.approx(180.0)
