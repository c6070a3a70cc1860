"""The reconstruction evaluation harness on two tiny phantom cases: DVG's input views and normalisation, the
back-projection baseline, a perfect method scoring the capped PSNR and SSIM 1, the tables, and the command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # training/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

from SVDRRLogic.volume_metrics import PSNR_ZERO_MSE_DB  # noqa: E402
from training.recon import evaluate as ev  # noqa: E402
from training.recon import preprocess as pp  # noqa: E402


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon") / "cases"
    pp.preprocess(pp.phantom_sources(2, shape=(16, 32, 32)), root, 32, test_fraction=0.5)
    return root


def _perfect(cases_dir, split, seen):
    """A method that cheats: it returns the ground truth of the cases in evaluation order."""
    truths = iter([ev.case_volume(cases_dir, e)[0] for e in ev.load_cases(cases_dir, split)])

    def reconstruct(xrays, views, grid):
        seen.append((xrays, views, grid))
        return next(truths)
    return reconstruct


def test_perfect_method_scores_ssim_1_and_the_capped_psnr(cases):
    seen = []
    result = ev.evaluate(_perfect(cases, "all", seen), cases, split="all", progress=False, method="oracle")
    assert result["n_cases"] == 2 and result["size"] == 32 and result["lpips_reduction"] is None
    for key in ("psnr_3d", "psnr_slices", "psnr_3d_x2ct4095", "psnr_slices_x2ct4095"):
        assert result["summary"][key] == {"mean": PSNR_ZERO_MSE_DB, "std": 0.0, "n": 2}
    assert result["summary"]["ssim_slices"]["mean"] == pytest.approx(1.0, abs=1e-9)
    xrays, views, grid = seen[0]
    assert views == [(0.0, 0.0), (90.0, 0.0)] and grid.shape == (32, 32, 32)
    for x in xrays:
        assert x.shape == (32, 32) and x.min() == 0.0 and x.max() == 1.0


def test_baseline_single_view_on_the_test_split_and_resized(cases, capsys):
    seen = []

    def spy(xrays, views, grid):
        seen.append(views)
        return ev.backprojection_baseline(xrays, views, grid)
    result = ev.evaluate(spy, cases, views="single", size=16, method="backprojection")
    assert result["n_cases"] == 1 and result["size"] == 16 and seen == [[(0.0, 0.0)]]
    row = result["cases"][0]
    assert 3.0 < row["psnr_3d"] < 30.0 and -1.0 < row["ssim_slices"] < 0.9
    assert row["psnr_3d_x2ct4095"] > row["psnr_3d"]
    assert result["summary"]["psnr_3d"]["std"] is None
    assert "[1/1]" in capsys.readouterr().err


def test_baseline_reconstruction_is_a_unit_volume_on_the_grid(cases):
    entry = ev.load_cases(cases, "all")[0]
    truth, grid = ev.case_volume(cases, entry)
    views = ev.dvg_views("biplanar")
    vol = ev.backprojection_baseline(ev.render_xrays(truth, grid, views), views, grid)
    assert vol.shape == grid.shape and vol.min() == 0.0 and vol.max() == 1.0


def test_tables_list_methods_conventions_and_published_rows(cases, tmp_path):
    results = [ev.evaluate(_perfect(cases, "all", []), cases, split="all", progress=False, method="oracle"),
               ev.evaluate(ev.backprojection_baseline, cases, split="all", progress=False, method="backprojection")]
    ev.write_table(results, tmp_path / "m.md", tmp_path / "m.json")
    md = (tmp_path / "m.md").read_text()
    for text in ("| oracle | biplanar | 2 | 100.00 ± 0.00", "backprojection", "PSNR-3D [0,1] (dB)",
                 "PSNR-slices X2CT 4095 (dB)", "SSIM-slices",
                 "| DVG-Diffusion (paper) | single | 102 | 22.54 | 0.541 | 36.79 |",
                 "| DVG-Diffusion (paper) | biplanar | 102 | 26.84 | 0.679 | 27.35 |"):
        assert text in md
    assert "LPIPS (sum" not in md.split("Published")[0]
    data = json.loads((tmp_path / "m.json").read_text())
    assert [r["method"] for r in data["results"]] == ["oracle", "backprojection"]
    assert len(data["results"][1]["cases"]) == 2 and len(data["published"]) == 2


def test_wrong_shape_and_bad_options_are_clear_errors(cases):
    with pytest.raises(ev.EvaluationError, match="shape"):
        ev.evaluate(lambda x, v, g: np.zeros((8, 8, 8)), cases, progress=False)
    with pytest.raises(ev.EvaluationError, match="views"):
        ev.evaluate(ev.backprojection_baseline, cases, views="triple", progress=False)
    with pytest.raises(ev.EvaluationError, match="no split"):
        ev.evaluate(ev.backprojection_baseline, cases, split="val", progress=False)


def test_command_line(cases, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    assert ev.main(["--cases", str(cases), "--method", "backprojection", "--out", str(out), "--views", "single",
                    "--split", "all"]) == 0
    assert (out / "metrics.md").is_file() and json.loads((out / "metrics.json").read_text())["results"]
    assert "backprojection" in capsys.readouterr().out
    for argv, word in ((["--cases", str(tmp_path / "none"), "--method", "backprojection", "--out", str(out)],
                        "no manifest.json"),
                       (["--cases", str(cases), "--method", "nope", "--out", str(out)], "nope")):
        assert ev.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err
    monkeypatch.setitem(sys.modules, "lpips", None)
    assert ev.main(["--cases", str(cases), "--method", "backprojection", "--out", str(out), "--lpips"]) == 2
    assert "svdrr[eval]" in capsys.readouterr().err
