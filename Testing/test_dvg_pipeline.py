"""DVG-Diffusion reconstruction end to end on tiny random models: the geometry mapping, the grid, the X-ray
fitting, the pipeline (CT in HU on a RAS grid, deterministic with a seed), model folders, ``reconstruct_ct`` and
``svdrr reconstruct`` with bad input. The CTs are noise from random weights; geometry, files, determinism and
errors are what is checked.
"""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="diffusers is not installed")

from SVDRRLogic.cli import main  # noqa: E402
from SVDRRLogic.images import CTVolume, ImageError, XRayImage  # noqa: E402
from SVDRRLogic.io import load_ct, load_xray, write_image  # noqa: E402
from SVDRRLogic.models.dvg import CONFIGS, build_dvg, cosine_betas, create_random  # noqa: E402
from SVDRRLogic.models.svdrr import ModelLoadError  # noqa: E402
from SVDRRLogic.pipelines.dvg import DVGReconstructionPipeline  # noqa: E402
from SVDRRLogic.recon_grid import (XRAYSYN_FRONTAL, XRAYSYN_LATERAL, XRAYSYN_NEW_VIEW, ReconGrid,  # noqa: E402
                                   fit_xray, hu_to_unit, unit_to_hu, xraysyn_view)
from SVDRRLogic.reconstruct import parse_xray_spec, reconstruct_ct  # noqa: E402

CENTER = (12.0, -30.0, 45.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return create_random(tmp_path_factory.mktemp("models") / "dvg-tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(model):
    return DVGReconstructionPipeline.from_folder(model, device="cpu")


def ball_volume(grid: ReconGrid, center_ijk, radius=2.0) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(grid.size),) * 3, indexing="ij")
    ci, cj, ck = center_ijk
    return (((i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2) <= radius ** 2).astype(np.float32)


def drrs(grid: ReconGrid, unit: np.ndarray, views) -> list[XRayImage]:
    geoms = [grid.geometry(*v) for v in views]
    images = grid.project(torch.from_numpy(unit), geoms).numpy()
    return [XRayImage(im, pixel_spacing=g.pixel[::-1], ijk_to_ras=g.detector_ijk_to_ras,
                      metadata={"geometry": g.to_dict()}) for im, g in zip(images, geoms)]


# -- geometry -----------------------------------------------------------------------------------------------
def test_xraysyn_views_map_to_our_angles():
    assert xraysyn_view(XRAYSYN_FRONTAL) == (0.0, 0.0)          # PA
    assert xraysyn_view(XRAYSYN_LATERAL) == (90.0, 0.0)         # source on the patient's right
    assert xraysyn_view(XRAYSYN_NEW_VIEW) == (45.0, 0.0)
    assert xraysyn_view(0.5 * math.pi) == (180.0, 0.0)
    assert xraysyn_view(math.pi) == (-90.0, 0.0)


def test_grid_is_a_320_mm_cube_in_lps_order_centred_on_its_point():
    grid = ReconGrid(32, CENTER)
    m = grid.ijk_to_ras
    assert grid.spacing == pytest.approx(10.0)
    np.testing.assert_allclose(m[:3, :3], np.diag([-10.0, -10.0, 10.0]))
    np.testing.assert_allclose(m @ [15.5, 15.5, 15.5, 1], [*CENTER, 1])
    g = grid.geometry(0.0, 0.0)
    assert (g.sad, g.sdd, g.detector) == (2500.0, 3000.0, (32, 32))
    assert g.pixel[0] * g.detector[0] == pytest.approx(320.0)    # the dvg-xraysyn detector, resampled
    np.testing.assert_allclose(g.isocenter, CENTER)


def test_hu_window_round_trip():
    hu = np.array([-2000.0, -1024.0, 0.0, 1476.0, 3000.0])
    np.testing.assert_allclose(hu_to_unit(hu), [0.0, 0.0, 0.4096, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(unit_to_hu(hu_to_unit(hu[1:4])), hu[1:4], atol=1e-3)


def test_sample_ct_puts_voxels_where_they_are_in_ras():
    grid = ReconGrid(16, CENTER)
    src = CTVolume(np.full((40, 40, 40), -1024.0, np.float32), np.diag([-8.0, -8.0, 8.0, 1.0]))
    target_ras = np.array([-100.0, -150.0, 60.0])
    ijk = np.linalg.solve(src.ijk_to_ras, [*target_ras, 1.0])[:3].round().astype(int)
    src.array_hu[ijk[2] - 1:ijk[2] + 2, ijk[1] - 1:ijk[1] + 2, ijk[0] - 1:ijk[0] + 2] = 1000.0
    unit = grid.sample_ct(src)
    k, j, i = np.unravel_index(np.argmax(unit), unit.shape)
    found = (grid.ijk_to_ras @ [i, j, k, 1.0])[:3]
    assert np.linalg.norm(found - target_ras) < grid.spacing


def test_back_projection_lands_where_the_projection_came_from():
    grid = ReconGrid(32, CENTER)
    spot = (20, 9, 24)                                     # i, j, k, off centre on every axis
    views = [xraysyn_view(XRAYSYN_FRONTAL), xraysyn_view(XRAYSYN_LATERAL)]
    images = [torch.from_numpy(fit_xray(x, grid.geometry(*v)))
              for x, v in zip(drrs(grid, ball_volume(grid, spot), views), views)]
    bp = grid.back_project(torch.stack(images), [grid.geometry(*v) for v in views], spread=True)
    product = (bp[0] * bp[1]).numpy()                     # only the spot is lit in both views
    k, j, i = np.unravel_index(np.argmax(product), product.shape)
    assert max(abs(i - spot[0]), abs(j - spot[1]), abs(k - spot[2])) <= 1


def test_fit_xray_matches_pixels_at_the_isocentre():
    """A DRR rendered at twice the model's resolution is resampled onto the model's detector."""
    grid, fine = ReconGrid(16, CENTER), ReconGrid(32, CENTER)
    unit = ball_volume(fine, (20, 12, 18), radius=4.0)
    hi = drrs(fine, unit, [(0.0, 0.0)])[0]
    lo = fit_xray(hi, grid.geometry(0.0, 0.0))
    direct = grid.project(torch.from_numpy(unit[::2, ::2, ::2].copy()), [grid.geometry(0.0, 0.0)])[0].numpy()
    assert lo.shape == (16, 16) and lo.min() == 0.0 and lo.max() == 1.0
    assert np.unravel_index(np.argmax(lo), lo.shape) == pytest.approx(
        np.unravel_index(np.argmax(direct), direct.shape), abs=1)
    plain = fit_xray(np.pad(np.ones((10, 10)), 3), grid.geometry(0.0, 0.0))  # no geometry: whole image resized
    assert plain[8, 8] == 1.0 and plain[0, 0] == 0.0
    with pytest.raises(ImageError, match="constant"):
        fit_xray(np.ones((20, 20)), grid.geometry(0.0, 0.0))


# -- models -----------------------------------------------------------------------------------------------
def test_cosine_schedule_is_the_authors():
    betas = cosine_betas(100)
    assert betas.shape == (100,) and betas.max() == pytest.approx(0.9999)
    alphas = np.cumprod(1 - betas)
    f = np.cos((np.arange(101) / 100 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(alphas[:99], (f / f[0])[1:100], rtol=1e-9)


def test_paper_configuration_has_the_published_sizes():
    parts = build_dvg("paper", empty=True)
    count = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in parts.modules().items()}
    assert count["coarse"] == pytest.approx(35.7, abs=0.1)
    assert count["denoiser"] == pytest.approx(134.5, abs=0.1)
    assert count["ct_vqgan"] == pytest.approx(1.39, abs=0.01)
    assert CONFIGS["paper"]["grid"] == 128 and CONFIGS["paper"]["timesteps"] == 100


def test_model_folder_refuses_broken_weights(model, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "coarse.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="coarse.safetensors"):
        DVGReconstructionPipeline.from_folder(broken, device="cpu")
    other = create_random(tmp_path / "other", {**CONFIGS["tiny"], "coarse": {**CONFIGS["tiny"]["coarse"],
                                                                           "dim": 16}})
    shutil.copy(other / "coarse.safetensors", broken / "coarse.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit"):
        DVGReconstructionPipeline.from_folder(broken, device="cpu")
    (broken / "config.json").write_text(json.dumps({"kind": "patch-edm", "format": 1}))
    with pytest.raises(ModelLoadError, match="not 'dvg'"):
        DVGReconstructionPipeline.from_folder(broken, device="cpu")


# -- pipeline ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_drrs():
    grid = ReconGrid(16, CENTER)
    unit = ball_volume(grid, (9, 7, 8), radius=4.0) * 0.5 + ball_volume(grid, (6, 9, 6), radius=2.0) * 0.5
    return drrs(grid, unit, [(0.0, 0.0), (90.0, 0.0)])


def test_pipeline_returns_a_synthetic_ct_in_hu_on_the_grid(pipe, phantom_drrs):
    steps = []
    out = pipe(phantom_drrs, [(0.0, 0.0), (90.0, 0.0)], generator=7, callback=lambda f, m: steps.append(f))
    grid = ReconGrid(16, CENTER)                           # the centre comes from the X-rays' stored isocenter
    assert out.ct.shape == (16, 16, 16) and out.ct.units == "hu"
    np.testing.assert_allclose(out.ct.ijk_to_ras, grid.ijk_to_ras)
    assert out.ct.array_hu.min() >= -1024.0 and out.ct.array_hu.max() <= 1476.0 + 1e-3
    assert out.ct.metadata["synthetic"] and out.ct.metadata["method"] == "dvg"
    assert out.ct.metadata["new_view_azimuth"] == 45.0 and out.ct.metadata["steps"] == 10
    assert set(out.intermediates) == {"back_projection", "initial_ct", "new_view"}
    assert out.intermediates["new_view"].array.shape == (16, 16)
    assert [x.array.max() for x in out.inputs] == [1.0, 1.0]
    assert steps[-1] == 1.0 and steps == sorted(steps)
    again = pipe(phantom_drrs, [(0.0, 0.0), (90.0, 0.0)], generator=7)
    np.testing.assert_array_equal(out.ct.array_hu, again.ct.array_hu)
    other = pipe(phantom_drrs, [(0.0, 0.0), (90.0, 0.0)], generator=8)
    assert np.abs(other.ct.array_hu - out.ct.array_hu).max() > 0


def test_pipeline_single_view_and_options(pipe, phantom_drrs):
    out = pipe(phantom_drrs[:1], [(0.0, 0.0)], generator=1, num_inference_steps=3, new_view="none",
               center_ras=(0.0, 0.0, 0.0))
    assert out.ct.metadata["new_view_azimuth"] == 90.0 and out.ct.metadata["steps"] == 3
    np.testing.assert_allclose(out.ct.center_ras, (0.0, 0.0, 0.0), atol=1e-9)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(phantom_drrs, [(0.0, 0.0), (90.0, 0.0)], num_inference_steps=11)
    with pytest.raises(ValueError, match="svdrr_pipeline"):
        pipe(phantom_drrs, [(0.0, 0.0), (90.0, 0.0)], new_view="svdrr")
    with pytest.raises(ImageError, match="one or two"):
        pipe(phantom_drrs * 2, [(0.0, 0.0)] * 4)
    with pytest.raises(ImageError, match="2 X-ray"):
        pipe(phantom_drrs, [(0.0, 0.0)])


def test_pipeline_refuses_a_view_count_the_model_was_not_trained_for(model, tmp_path):
    biplanar_only = create_random(tmp_path / "bi", {**CONFIGS["tiny"], "input_views": [2]})
    pipe = DVGReconstructionPipeline.from_folder(biplanar_only, device="cpu")
    with pytest.raises(ImageError, match="trained with 2 X-ray"):
        pipe([np.random.default_rng(0).random((16, 16))], [(0.0, 0.0)])


# -- files and command line -------------------------------------------------------------------------------
def test_parse_xray_spec(tmp_path):
    assert parse_xray_spec("a.png@-30,10") == ("a.png", (-30.0, 10.0))
    assert parse_xray_spec("a.png@90") == ("a.png", (90.0, 0.0))  # as --view 90
    assert parse_xray_spec("me@home/a.png") == ("me@home/a.png", None)
    assert parse_xray_spec("a.png") == ("a.png", None)
    with pytest.raises(ImageError, match=r"AZIMUTH\[,ELEVATION\]"):
        parse_xray_spec("a.png@x,1")
    film = tmp_path / "film.png"
    film.write_bytes(b"")
    for tail in ("abc", "0,0,0"):  # after an existing file, a mistyped view, not a missing file
        with pytest.raises(ImageError, match="the view after @"):
            parse_xray_spec(f"{film}@{tail}")


def test_reconstruct_ct_writes_the_ct_and_intermediates(model, phantom_drrs, tmp_path):
    files = [write_image(tmp_path / f"view{i}.nrrd", x) for i, x in enumerate(phantom_drrs)]
    keep = tmp_path / "keep"
    manifest = reconstruct_ct([str(files[0]), f"{files[1]}@90,0"], tmp_path / "ct.nii.gz", model=model, seed=3,
                              keep=keep, device="cpu")
    ct = load_ct(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(ct.ijk_to_ras, ReconGrid(16, CENTER).ijk_to_ras, atol=1e-4)
    assert manifest["method"] == "dvg" and manifest["synthetic"] and manifest["seed"] == 3
    assert [i["view"] for i in manifest["inputs"]] == [[0.0, 0.0], [90.0, 0.0]]
    assert sorted(p.name for p in keep.iterdir()) == sorted(
        ["back_projection.nii.gz", "initial_ct.nii.gz", "input_0.nrrd", "input_1.nrrd", "new_view.nrrd",
         "reconstruction.json"])
    assert load_xray(keep / "input_0.nrrd").metadata["synthetic"]  # DRRs in, marked DRRs kept
    assert load_xray(keep / "new_view.nrrd").metadata["synthetic"]


def test_cli_reconstruct_and_its_errors(model, phantom_drrs, tmp_path, capsys):
    png = write_image(tmp_path / "film.png", phantom_drrs[0].array)           # a PNG knows no view
    assert main(["reconstruct", f"{png}@0,0", "-o", str(tmp_path / "ct.nrrd"), "--model", str(model),
                 "--steps", "2", "--device", "cpu"]) == 0
    assert "synthetic CT, not for diagnosis" in capsys.readouterr().out
    assert (tmp_path / "ct.nrrd").exists()
    cases = [
        ([str(png), "-o", str(tmp_path / "x.nii.gz"), "--model", str(model)], "view is unknown"),
        ([f"{png}@0,0", "-o", str(tmp_path / "x.png"), "--model", str(model)], "write the CT as"),
        ([f"{png}@0,0", "-o", str(tmp_path / "no" / "x.nii.gz"), "--model", str(model)], "does not exist"),
        ([f"{png}@0,0", "-o", str(tmp_path / "x.nii.gz"), "--model", str(model), "--keep-intermediates", str(png)],
         "needs a folder"),
        ([f"{png}@0,0", "-o", str(tmp_path / "x.nii.gz"), "--model", str(model), "--method", "patch-edm"],
         "cannot run --method patch-edm"),
        ([f"{png}@0,0", "-o", str(tmp_path / "x.nii.gz"), "--model", str(tmp_path / "nowhere")],
         "no model folder"),
        ([f"{png}@0,0"] * 3 + ["-o", str(tmp_path / "x.nii.gz"), "--model", str(model)], "one or two"),
        ([f"{tmp_path / 'missing.png'}@0,0", "-o", str(tmp_path / "x.nii.gz"), "--model", str(model)],
         "missing.png"),
    ]
    for args, message in cases:
        assert main(["reconstruct", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.nii.gz").exists()


def test_views_and_layout_read_from_dicom_attributes():
    from SVDRRLogic.reconstruct import load_inputs, oriented, view_from_file
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    ap = XRayImage(image, metadata={"view_position": "AP", "patient_orientation": ["L", "F"]}, source="ap.dcm")
    assert view_from_file(ap) == (180.0, 0.0)
    flipped = oriented(ap, (180.0, 0.0))            # displayed like a PA film: mirrored to the AP detector
    np.testing.assert_array_equal(flipped.array, image[:, ::-1])
    assert oriented(ap, (0.0, 0.0)) is ap           # already laid out as a PA detector
    lateral = XRayImage(image, metadata={"view_position": "LL"})
    angled = XRayImage(image, metadata={"positioner_primary_angle": 30.0, "positioner_secondary_angle": -10.0,
                                        "view_position": "PA"})
    assert view_from_file(lateral) == (90.0, 0.0) and view_from_file(angled) == (30.0, -10.0)
    images, views = load_inputs([(ap, None), (lateral, (-90.0, 5.0))])
    assert views == [(180.0, 0.0), (-90.0, 5.0)]
    np.testing.assert_array_equal(images[0].array, image[:, ::-1])
    with pytest.raises(ImageError, match="view is unknown"):
        load_inputs([(XRayImage(image), None)])


def test_models_create_random_for_the_dvg_catalogue_entry(tmp_path):
    assert main(["models", "create-random", "dvg-diffusion", "-o", str(tmp_path / "dvg")]) == 0
    pipe = DVGReconstructionPipeline.from_folder(tmp_path / "dvg", device="cpu")
    assert pipe.grid_size == CONFIGS["tiny"]["grid"]
