"""Long jobs in a separate process: the real worker renders an orbit, bad jobs fail cleanly, cancel ends the tree.

The worker is run exactly as Slicer runs it (``python SVDRRWorker.py job.json``), with plain Python instead of
PythonSlicer. Process-tree checks read ``/proc`` (Linux) or psutil; they are skipped where neither exists.
"""
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from SVDRRLogic import CArmGeometry, jobs
from SVDRRLogic.jobs import CANCELLED, FAILED, FINISHED, Job, start_job, write_job_file

WORKER = Path(__file__).resolve().parent.parent / "SVDRRSlicer" / "Scripts" / "SVDRRWorker.py"
HAVE_PROC = Path("/proc/self/stat").exists()
pytestmark = pytest.mark.skipif(os.name != "posix", reason="process-tree checks are written for POSIX")


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    from SVDRRLogic.io import write_ct
    from SVDRRLogic.phantoms import chest_phantom

    ct = chest_phantom(shape=(48, 96, 96), spacing=(3.7, 3.7, 6.7))
    return write_ct(tmp_path_factory.mktemp("ct") / "chest.nrrd", ct), ct


def small_geometry(ct, **overrides):
    return CArmGeometry.preset("svdrr-lidc", isocenter=ct.center_ras, detector=(48, 40), pixel=(8.0, 8.0),
                               **overrides)


def worker_job(tmp_path, spec):
    return Job([sys.executable, str(WORKER), str(write_job_file(spec, tmp_path / "job.json"))])


def process_status(pid):
    """'gone', 'zombie' or 'alive' for a pid (Linux /proc, else psutil)."""
    if HAVE_PROC:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return "gone"
        return "zombie" if state == "Z" else "alive"
    psutil = pytest.importorskip("psutil")
    try:
        return "zombie" if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE else "alive"
    except psutil.NoSuchProcess:
        return "gone"


def wait_gone(pid, timeout=10.0):
    """Wait until a process no longer runs; an orphan may briefly stay a zombie until init reaps it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = process_status(pid)
        if status == "gone":
            return status
        time.sleep(0.05)
    return process_status(pid)


# -- the real worker ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("views, fmt, expected", [("arc:-30:30:15", "nrrd", [(-30, 0), (-15, 0), (0, 0), (15, 0),
                                                                             (30, 0)]),
                                                  ([[0, 0], [90, -20]], "png", [(0, 0), (90, -20)])])
def test_worker_renders_an_orbit(tmp_path, ct_file, views, fmt, expected):
    path, ct = ct_file
    out = tmp_path / "orbit"
    job = worker_job(tmp_path, {"task": "render_orbit", "ct": str(path), "geometry": small_geometry(ct).to_dict(),
                                "views": views, "output_dir": str(out), "format": fmt, "device": "cpu",
                                "batch": 2})
    job.start()
    assert job.state == "running" and job.pid
    events = job.wait(timeout=120)
    assert job.state == FINISHED, job.error
    assert job.returncode == 0 and job.error is None
    fractions = [e["fraction"] for e in events if e["type"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    view_messages = [e for e in events if e["type"] == "progress" and e["message"].startswith("view ")]
    assert len(view_messages) == len(expected)  # one progress event per view
    (result,) = [e for e in events if e["type"] == "result"]
    assert events[-1] == {"type": "exit", "state": FINISHED, "returncode": 0, "message": "finished"}
    assert result["count"] == len(expected) and job.outputs == result["outputs"]
    files = [Path(p) for p in result["outputs"]]
    assert all(p.is_file() and p.stat().st_size > 0 and p.suffix == "." + fmt for p in files)
    manifest = json.loads(Path(result["views_json"]).read_text())
    assert [(v["azimuth"], v["elevation"]) for v in manifest["views"]] == expected
    assert sorted(out / v["file"] for v in manifest["views"]) == sorted(files)
    assert CArmGeometry.from_dict(manifest["views"][0]).detector == (48, 40)
    assert process_status(job.pid) == "gone"  # reaped: no zombie left behind


def test_worker_accepts_a_preset_geometry_and_centres_the_isocenter(tmp_path, ct_file):
    path, ct = ct_file
    job = worker_job(tmp_path, {"task": "render_orbit", "ct": str(path), "views": [[10, 5]],
                                "geometry": {"preset": "x2ct", "detector": [32, 32], "pixel": [10, 10]},
                                "output_dir": str(tmp_path / "o"), "device": "cpu"})
    job.start().wait(timeout=120)
    assert job.state == FINISHED, job.error
    view = json.loads(Path(job.result["views_json"]).read_text())["views"][0]
    assert view["preset_name"] == "x2ct" and view["sad"] == 541.0
    assert view["isocenter"] == pytest.approx(list(ct.center_ras))


@pytest.mark.parametrize("spec, words", [
    ({"task": "render_orbit", "ct": "MISSING", "geometry": {"preset": "svdrr-lidc"}, "views": "arc:0:10:10",
      "output_dir": "OUT"}, ["MISSING", "does not exist"]),
    ({"task": "render_orbit", "ct": "CT", "geometry": {"preset": "svdrr-lidc"}, "views": "arc:0:10:10",
      "output_dir": "OUT", "format": "gif"}, ["unknown format", "gif"]),
    ({"task": "render_orbit", "ct": "CT", "geometry": {"preset": "svdrr-lidc"}, "views": "spiral:3",
      "output_dir": "OUT"}, ["bad view set", "spiral"]),
    ({"task": "render_orbit", "ct": "CT", "views": "arc:0:10:10", "output_dir": "OUT"}, ["no 'geometry'"]),
    ({"task": "make_coffee"}, ["unknown task", "make_coffee", "render_orbit"]),
    ({"ct": "CT"}, ["unknown task", "None"]),
])
def test_bad_job_gives_one_error_event_and_failed_state(tmp_path, ct_file, spec, words):
    spec = {k: (str(ct_file[0]) if v == "CT" else str(tmp_path / v) if v in ("MISSING", "OUT") else v)
            for k, v in spec.items()}
    job = worker_job(tmp_path, spec)
    events = job.start().wait(timeout=60)
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1, events
    assert job.state == FAILED and job.returncode == 1
    assert all(w in errors[0]["message"] for w in words), errors[0]["message"]
    assert job.error == errors[0]["message"] and "Traceback" in errors[0]["detail"]
    assert not [e for e in events if e["type"] == "result"]
    assert events[-1]["type"] == "exit" and events[-1]["state"] == FAILED
    assert not (tmp_path / "OUT").exists()


@pytest.mark.parametrize("content, words", [("{not json", ["not valid JSON"]), ("[1, 2]", ["JSON object"]),
                                            (None, ["cannot read the job file"])])
def test_unreadable_job_file(tmp_path, content, words):
    job_file = tmp_path / "job.json"
    if content is not None:
        job_file.write_text(content)
    job = start_job([sys.executable, str(WORKER), str(job_file)])
    job.wait(timeout=60)
    assert job.state == FAILED and job.returncode == 1
    assert all(w in job.error for w in words), job.error


def test_worker_without_job_file_is_a_usage_error():
    job = start_job([sys.executable, str(WORKER)])
    events = job.wait(timeout=60)
    assert job.state == FAILED and job.returncode == 2 and "usage" in job.error
    assert [e["type"] for e in events] == ["error", "exit"]


def test_cancel_a_long_orbit_ends_the_worker(tmp_path, ct_file):
    path, ct = ct_file
    job = worker_job(tmp_path, {"task": "render_orbit", "ct": str(path), "geometry": small_geometry(ct).to_dict(),
                                "views": "arc:-180:180:0.05", "output_dir": str(tmp_path / "long"),
                                "format": "nrrd", "device": "cpu", "batch": 1})
    job.start()
    deadline = time.monotonic() + 60
    seen = []
    while not any(e["type"] == "progress" and e["message"].startswith("view ") for e in seen):
        assert time.monotonic() < deadline, "no view was rendered within 60 s"
        seen += job.poll()
        time.sleep(0.02)
    assert job.state == "running" and 0 < job.fraction < 0.5
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 5.0
    assert job.state == CANCELLED and job.returncode is not None and job.returncode != 0
    assert process_status(job.pid) == "gone"  # ended and reaped
    rest = job.poll()
    assert rest[-1] == {"type": "exit", "state": CANCELLED, "returncode": job.returncode, "message": "cancelled"}
    assert job.poll() == [] and not (tmp_path / "long" / "views.json").exists()
    job.cancel()  # a second cancel is harmless


# -- process trees, with throwaway workers -------------------------------------------------------------------
SPAWNER = textwrap.dedent("""
    import json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session={escape})
    print(json.dumps({{"type": "log", "message": str(child.pid)}}), flush=True)
    print(json.dumps({{"type": "progress", "fraction": 0.1, "message": "waiting"}}), flush=True)
    time.sleep(120)
""")


def first_log_pid(job, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in job.poll():
            if event["type"] == "log" and event.get("stream") is None:
                return int(event["message"])
        time.sleep(0.02)
    raise AssertionError("the worker did not report its child")


@pytest.mark.parametrize("use_psutil", [False, True], ids=["process-group", "psutil"])
def test_cancel_ends_the_worker_and_its_child(use_psutil):
    if use_psutil:
        pytest.importorskip("psutil")
    job = start_job([sys.executable, "-c", SPAWNER.format(escape=False)], use_psutil=use_psutil)
    child = first_log_pid(job)
    assert process_status(child) == "alive" and process_status(job.pid) == "alive"
    started = time.monotonic()
    job.cancel()
    assert job.state == CANCELLED
    assert process_status(job.pid) == "gone"
    assert wait_gone(child) == "gone"
    assert time.monotonic() - started < 10.0


def test_psutil_also_ends_a_child_that_left_the_process_group():
    pytest.importorskip("psutil")
    job = start_job([sys.executable, "-c", SPAWNER.format(escape=True)], use_psutil=True)
    child = first_log_pid(job)
    assert os.getpgid(child) != job.pid  # out of reach of killpg
    job.cancel()
    assert job.state == CANCELLED and wait_gone(child) == "gone"


def test_context_manager_cancels_a_running_job():
    with start_job([sys.executable, "-c", "import time; time.sleep(60)"]) as job:
        assert job.state == "running"
    assert job.state == CANCELLED and process_status(job.pid) == "gone"


# -- exit-code handling without the real worker ------------------------------------------------------------
def test_crash_without_error_event_is_failed_with_the_stderr_tail():
    code = "import sys\nfor i in range(80): sys.stderr.write(f'line {i}\\n')\nsys.stderr.write('boom\\n'); sys.exit(3)"
    job = start_job([sys.executable, "-c", code])
    events = job.wait(timeout=30)
    assert job.state == FAILED and job.returncode == 3
    assert "exit code 3" in job.error and job.error.rstrip().endswith("boom") and "line 79" in job.error
    assert "line 5\n" not in job.error  # only the tail
    assert sum(e.get("stream") == "stderr" for e in events) == 81
    assert events[-1]["state"] == FAILED and events[-1]["message"] == job.error


def test_killed_by_a_signal_is_reported():
    job = start_job([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    job.wait(timeout=30)
    assert job.state == FAILED and job.returncode < 0 and "SIGKILL" in job.error


def test_clean_exit_without_result_is_failed():
    job = start_job([sys.executable, "-c", "print('hello')"])
    events = job.wait(timeout=30)
    assert job.state == FAILED and job.returncode == 0 and "without a result" in job.error
    assert {"type": "log", "level": "info", "stream": "stdout", "message": "hello"} in events


def test_error_event_wins_over_exit_code_zero_and_odd_lines_are_logs():
    code = textwrap.dedent("""
        import json
        print('{"type": "progress", "fraction": 7}')
        print('{"type": "unknown"}')
        print('{broken')
        print(json.dumps({"type": "error", "message": "model weights missing"}))
    """)
    job = start_job([sys.executable, "-c", code])
    events = job.wait(timeout=30)
    assert job.state == FAILED and job.error == "model weights missing"
    assert events[0] == {"type": "progress", "fraction": 1.0, "message": ""}  # clamped
    assert [e["message"] for e in events if e["type"] == "log"] == ['{"type": "unknown"}', "{broken"]


def test_poll_never_blocks_and_wait_times_out():
    job = start_job([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = time.monotonic()
        assert job.poll() == [] and job.poll() == []
        assert time.monotonic() - started < 0.5
        with pytest.raises(TimeoutError):
            job.wait(timeout=0.3)
        assert job.state == "running"
    finally:
        job.cancel()


def test_a_descendant_holding_the_pipes_does_not_keep_the_job_alive():
    code = textwrap.dedent("""
        import json, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # inherits stdout
        print(json.dumps({"type": "log", "message": str(child.pid)}))
        print(json.dumps({"type": "result", "outputs": ["x"]}), flush=True)
    """)
    job = Job([sys.executable, "-c", code], linger=0.5).start()
    started = time.monotonic()
    events = job.wait(timeout=30)
    assert job.state == FINISHED and job.outputs == ["x"]
    assert time.monotonic() - started < 10.0
    child = int([e for e in events if e["type"] == "log"][0]["message"])
    assert wait_gone(child) == "gone"


def test_bad_command_and_misuse():
    with pytest.raises(jobs.JobError, match="cannot start"):
        start_job([str(Path("/nonexistent/python"))])
    with pytest.raises(jobs.JobError):
        Job([])
    job = Job([sys.executable, "-c", "pass"])
    assert job.state == "pending" and job.poll() == []
    job.cancel()  # nothing to cancel
    job.start()
    with pytest.raises(jobs.JobError, match="already"):
        job.start()
    job.wait(timeout=30)
    assert jobs.TREE_KILL in ("psutil + process group", "process group", "psutil", "taskkill")


def test_write_job_file_handles_paths_and_numpy(tmp_path):
    import numpy as np

    path = write_job_file({"ct": tmp_path / "a.nrrd", "iso": np.array([1.0, 2.0]), "n": np.int64(3)},
                          tmp_path / "sub" / "job.json")
    assert json.loads(path.read_text()) == {"ct": str(tmp_path / "a.nrrd"), "iso": [1.0, 2.0], "n": 3}
    with pytest.raises(TypeError):
        write_job_file({"x": object()}, tmp_path / "bad.json")
