"""Our geometry convention against two independent renderers: plastimatch ``drr`` and DiffDRR (trilinear).

A 'mu' phantom (a weak ellipsoidal body and a bright Gaussian blob off every axis) on anisotropic, reoriented voxel grids
is rendered by all three for oblique views on a non-square detector with non-square pixels. They must agree in
shape (Pearson r), in scale (total line integral) and in where the blob lands (pixel centroid of the blob's
own contribution, also against ``CArmGeometry.project``), which rules out flips, transposes and offsets.
Each peer's tests skip when the peer is not installed.
"""
import numpy as np
import pytest

from SVDRRLogic import peers
from SVDRRLogic.geometry import CArmGeometry
from SVDRRLogic.images import CTVolume
from SVDRRLogic.renderer import DRRRenderer

BLOB_RAS = np.array([25.0, -12.0, 18.0])
VIEWS = [(0.0, 0.0), (30.0, -10.0), (-60.0, 20.0), (90.0, 0.0)]
SPACING = np.array([2.5, 2.0, 3.0])  # i, j, k
SHAPE = (40, 48, 56)  # k, j, i


def grid(kind: str) -> np.ndarray:
    """IJK-to-RAS of the phantom grid: DICOM-like (i -> left, j -> posterior), permuted axes, or oblique."""
    m = np.eye(4)
    if kind == "lps":
        m[:3, :3] = np.diag([-SPACING[0], -SPACING[1], SPACING[2]])
        m[:3, 3] = [70.0, 47.0, -58.0]
    elif kind == "permuted":  # i -> superior, j -> right, k -> posterior
        m[:3, :3] = np.array([[0, SPACING[1], 0], [0, 0, -SPACING[2]], [SPACING[0], 0, 0]])
        m[:3, 3] = [-47.0, 58.0, -70.0]
    elif kind == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        m[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(SPACING)
        m[:3, 3] = [-60.0, -55.0, -58.0]
    else:
        raise ValueError(kind)
    return m


def phantom(kind: str, blob: bool = True, units: str = "mu") -> CTVolume:
    m = grid(kind)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    ras = np.einsum("ab,kjib->kjia", m[:3, :3], np.stack([ii, jj, kk], -1)) + m[:3, 3]
    a = np.zeros(SHAPE, np.float32)
    a[((ras[..., 0] / 55) ** 2 + (ras[..., 1] / 40) ** 2 + (ras[..., 2] / 50) ** 2) <= 1] = 0.02
    if blob:  # smooth, so that point-sampling a box-voxel (Siddon) image does not move its centroid
        a += 0.1 * np.exp(-np.sum((ras - BLOB_RAS) ** 2, axis=-1) / (2 * 5.0 ** 2)).astype(np.float32)
    if units == "hu":  # the same object in HU for the physical model (mu_water 0.0193/mm); air -1000
        a = np.where(a > 0, a / 0.0193 * 1000.0 - 1000.0, -1000.0).astype(np.float32)
    return CTVolume(a, m, units=units)


def geometry(ct: CTVolume, az: float, el: float) -> CArmGeometry:
    return CArmGeometry(azimuth=az, elevation=el, sad=600.0, sdd=900.0, detector=(64, 48), pixel=(3.1, 3.6),
                        isocenter=tuple(ct.center_ras + np.array([4.0, -3.0, 2.0])))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def centroid(img: np.ndarray) -> np.ndarray:
    """(col, row) centroid of the positive part of ``img``."""
    w = np.clip(img, 0, None)
    rows, cols = np.indices(img.shape)
    return np.array([(w * cols).sum(), (w * rows).sum()]) / w.sum()


def ours(kind: str, az: float, el: float) -> tuple[np.ndarray, np.ndarray]:
    """Our full image and the blob's own contribution (with minus without the blob)."""
    ct, body = phantom(kind), phantom(kind, blob=False)
    g = geometry(ct, az, el)
    full = DRRRenderer(ct, device="cpu").render(g)
    return full, full - DRRRenderer(body, device="cpu").render(g)


def check_agreement(render, kind: str, az: float, el: float, atol_px: float) -> None:
    """``atol_px``: allowed blob displacement from ours. Siddon (plastimatch) integrates box voxels and its point-
    sampled image aliases by up to ~0.25 px on views along a voxel axis; trilinear peers agree to ~0.01 px."""
    ct, body = phantom(kind), phantom(kind, blob=False)
    g = geometry(ct, az, el)
    mine, mine_blob = ours(kind, az, el)
    res = render(ct, g)
    theirs = res.image
    assert theirs.shape == g.shape == mine.shape
    assert theirs.dtype == np.float32
    r = pearson(mine, theirs)
    assert r > 0.99, f"{res.peer} vs ours at ({az}, {el}): r = {r:.5f}"
    assert pearson(mine, theirs[:, ::-1]) < r and pearson(mine, theirs[::-1]) < r
    assert abs(theirs.sum() / mine.sum() - 1) < 0.02, "line integrals differ in scale"
    theirs_blob = theirs - render(body, g).image
    expected = g.project(BLOB_RAS)
    assert np.allclose(centroid(mine_blob), expected, atol=0.5), (centroid(mine_blob), expected)
    assert np.allclose(centroid(theirs_blob), centroid(mine_blob), atol=atol_px), \
        f"{res.peer}: blob at {centroid(theirs_blob)}, ours at {centroid(mine_blob)} (col, row)"
    assert res.seconds >= 0 and res.wall_seconds >= res.seconds


# -- availability (no peer needed) --------------------------------------------------------------------------
def test_unknown_peer_is_an_error():
    with pytest.raises(ValueError, match="unknown peer"):
        peers.available("deepdrr")
    assert set(peers.PEER_CLASSES) == set(peers.PEERS)


def test_missing_peers_report_a_reason(monkeypatch):
    monkeypatch.setenv("SVDRR_PLASTIMATCH", "no-such-plastimatch-binary")
    ok, why = peers.available("plastimatch")
    assert not ok and "PATH" in why
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("diffdrr", "torchio") else real(name, *a))
    status = peers.available("diffdrr")
    assert not status and "pip install" in status.reason
    with pytest.raises(peers.PeerError):
        peers.DiffDRRPeer(phantom("lps"))


# -- plastimatch --------------------------------------------------------------------------------------------
_PLASTIMATCH = peers.plastimatch_available()  # shutil.which("plastimatch"), or $SVDRR_PLASTIMATCH
needs_plastimatch = pytest.mark.skipif(not _PLASTIMATCH, reason=_PLASTIMATCH.reason)


@needs_plastimatch
@pytest.mark.parametrize("az,el", VIEWS)
@pytest.mark.parametrize("kind", ["lps", "permuted"])
def test_plastimatch_agrees(kind, az, el):
    check_agreement(peers.render_plastimatch, kind, az, el, atol_px=0.3)


@needs_plastimatch
def test_plastimatch_oblique_volume_is_resampled_not_blank():
    check_agreement(peers.render_plastimatch, "oblique", 30.0, -10.0, atol_px=0.3)


@needs_plastimatch
def test_plastimatch_hu_models():
    """HU input: our physical model written as mu, and plastimatch's own conversion (mu_water 0.022/mm)."""
    ct_hu = phantom("lps", units="hu")
    g = geometry(ct_hu, 30.0, -10.0)
    mine = DRRRenderer(ct_hu, device="cpu", hu_model="physical").render(g)
    physical = peers.render_plastimatch(ct_hu, g, hu_model="physical").image
    assert pearson(mine, physical) > 0.99 and abs(physical.sum() / mine.sum() - 1) < 0.02
    own = peers.render_plastimatch(ct_hu, g, hu_model="plastimatch").image
    assert pearson(mine, own) > 0.99
    assert abs(own.sum() / mine.sum() - 0.022 / 0.0193) < 0.03


# -- DiffDRR ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("az,el", VIEWS)
@pytest.mark.parametrize("kind", ["lps", "permuted"])
def test_diffdrr_agrees(kind, az, el):
    pytest.importorskip("diffdrr.drr")
    check_agreement(peers.render_diffdrr, kind, az, el, atol_px=0.05)


def test_diffdrr_oblique_volume():
    pytest.importorskip("diffdrr.drr")
    check_agreement(peers.render_diffdrr, "oblique", -60.0, 20.0, atol_px=0.05)


def test_diffdrr_own_hu_transform_matches_ours():
    """DiffDRR's own transform_hu_to_density against our hu_to_mu('diffdrr'): same image, not only same shape."""
    pytest.importorskip("diffdrr.drr")
    ct_hu = phantom("permuted", units="hu")
    ct_hu.array_hu[5:9, 10:20, 30:40] = 900.0  # some "bone" above DiffDRR's 350 HU threshold
    g = geometry(ct_hu, -60.0, 20.0)
    mine = DRRRenderer(ct_hu, device="cpu", hu_model="diffdrr").render(g)
    theirs = peers.render_diffdrr(ct_hu, g, hu_model="diffdrr").image
    assert pearson(mine, theirs) > 0.999
    assert abs(theirs.sum() / mine.sum() - 1) < 0.01
