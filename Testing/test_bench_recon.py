"""``svdrr bench-recon`` on the tiny configurations: one row per method with its grid, parameters, a time per
volume extrapolated from two step counts, and the peak memory; bad arguments are one line and exit code 2."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from SVDRRLogic.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_recon_rows(capsys):
    assert main(["bench-recon", "--configs", "tiny", "--steps", "2", "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["config"], r["grid"]) for r in rows] == [("dvg", "tiny", 16), ("patch-edm", "tiny", 16)]
    for r in rows:
        assert r["measured_steps"] == [2, 4] and r["steps"] > 4
        assert r["s_per_step"] > 0 and r["seconds"] >= r["s_per_step"] * r["steps"]
        assert r["params_m"] > 0


def test_bench_recon_bad_arguments(capsys):
    assert main(["bench-recon", "--configs", "huge"]) == 2
    assert main(["bench-recon", "--methods", "dvg", "--steps", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
