"""Run a script the way ``Slicer --no-main-window --python-script SCRIPT -- ARGS`` runs it, without Slicer.

Slicer runs such a script with its own ``slicer`` module already imported, which has ``slicer.app`` (no layout
manager without a main window; an application logic with view logics and the Markups module logic),
``slicer.mrmlScene``, ``slicer.modules`` and ``slicer.util.exit``, and sets ``sys.argv = [SCRIPT, "--", ARGS...]``.
The stand-in gives slicer-core's ``slicer`` module those attributes, runs the script as ``__main__`` in a child
process, and reports what the script left in ``slicer.mrmlScene`` and the codes it passed to ``slicer.util.exit``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STANDIN = """
import json, runpy, sys, types
import slicer
import vtk
from SVDRRLogic import mrml

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)  # Slicer's log is not the script's stderr
scene = mrml.new_scene()
app_logic = slicer.vtkSlicerApplicationLogic()
app_logic.SetMRMLScene(scene)
app_logic.SetViewLogics(vtk.vtkCollection())
app_logic.SetSliceLogics(vtk.vtkCollection())
markups = slicer.vtkSlicerMarkupsLogic()
markups.SetMRMLApplicationLogic(app_logic)
markups.SetMRMLScene(scene)
app_logic.SetModuleLogic("Markups", markups)
slicer.mrmlScene = scene
slicer.modules = types.SimpleNamespace()
slicer.app = types.SimpleNamespace(layoutManager=lambda: None, applicationLogic=lambda: app_logic)
exits = []
def fake_exit(code):
    exits.append(code)
    raise SystemExit(code)
slicer.util.exit = fake_exit
script, args = sys.argv[1], sys.argv[2:]
sys.argv = [script, "--", *args]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    pass
kinds = [scene.GetNthNode(i).GetAttribute("SVDRR.Kind") for i in range(scene.GetNumberOfNodes())]
print(json.dumps({"exits": exits, "drr_nodes": kinds.count("DRR")}))
"""


def start(script, *args) -> subprocess.Popen:
    """Start ``script`` with ``args`` under the stand-in; finish with :func:`finish`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("SVDRR_DEBUG", None)
    return subprocess.Popen([sys.executable, "-c", STANDIN, str(script), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, dict, str]:
    """(return code, the stand-in's report: {"exits": [...], "drr_nodes": n}, stderr)."""
    out, err = process.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return process.returncode, report, err
