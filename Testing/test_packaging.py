"""Packaging of the Slicer extension: CMake lists match the files on disk, the ExtensionsIndex entry is valid, the
installed layout works.

The layout check configures ``SVDRRSlicer/CMakeLists.txt`` with the real ``cmake`` and stand-ins for the two
Slicer/CTK macros it calls; the stand-ins place files exactly as the real ones do (``<DESTINATION_DIR>/<path as
listed>``, read from ``<SOURCE_DIR>/<path as listed>``, per CTK's ctkMacroCompilePythonScript.cmake), so the test
sees the folder Slicer would install and runs the worker from it.
"""
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_CMAKE = ROOT / "SVDRRSlicer" / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
INDEX_ENTRY = ROOT / "SVDRR.json"
IGNORED = {"__pycache__", ".DS_Store"}

# ExtensionsIndex catalog entry schema v1.0.1 (Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json):
# additionalProperties false, required $schema/category/scm_url.
SCHEMA_KEYS = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
# A few of the categories ExtensionsIndex's scripts/check_description_files.py accepts.
KNOWN_CATEGORIES = {"Image Synthesis", "Simulation", "Tomographic Reconstruction", "Rendering", "IGT",
                    "Radiotherapy", "Segmentation", "Utilities", "Examples"}


def cmake_lists(text: str) -> dict[str, list[str]]:
    """``set(NAME items...)`` blocks of a CMakeLists (comments dropped, ${MODULE_NAME} expanded)."""
    text = re.sub(r"#[^\n]*", "", text)
    values = {}
    for name, body in re.findall(r"\bset\(\s*(\w+)\s+(.*?)\)", text, flags=re.S):
        values[name] = body.split()
    module = values.get("MODULE_NAME", [""])[0]
    return {k: [v.replace("${MODULE_NAME}", module).strip('"') for v in items] for k, items in values.items()}


def files_under(folder: Path, suffix: str | None = None) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() and not IGNORED & set(p.parts)
            and (suffix is None or p.suffix == suffix)}


@pytest.fixture(scope="module")
def module_lists():
    return cmake_lists(MODULE_CMAKE.read_text())


def listed(module_lists, name) -> list[str]:
    items = module_lists[name]
    assert len(items) == len(set(items)), f"{name} lists a file twice"
    return items


def test_every_python_file_is_listed_and_none_is_stale(module_lists):
    scripts = listed(module_lists, "MODULE_PYTHON_SCRIPTS")
    expected = {f"../{p.relative_to(ROOT).as_posix()}" for p in files_under(ROOT / "SVDRRLogic", ".py")}
    expected |= {p.relative_to(ROOT / "SVDRRSlicer").as_posix() for p in files_under(ROOT / "SVDRRSlicer", ".py")}
    assert sorted(expected - set(scripts)) == [], "missing from MODULE_PYTHON_SCRIPTS"
    assert sorted(set(scripts) - expected) == [], "stale in MODULE_PYTHON_SCRIPTS"
    assert scripts[0] == "SVDRRSlicer.py"


def test_every_resource_is_listed_and_none_is_stale(module_lists):
    """Everything in Resources/ ships with the module, except the screenshots (for the README and the index)."""
    resources = listed(module_lists, "MODULE_PYTHON_RESOURCES")
    expected = {f"../{p.relative_to(ROOT).as_posix()}" for p in files_under(ROOT / "Resources")
                if p.parent.name != "Screenshots"}
    assert sorted(expected - set(resources)) == [], "missing from MODULE_PYTHON_RESOURCES"
    assert sorted(set(resources) - expected) == [], "stale in MODULE_PYTHON_RESOURCES"
    assert {"../Resources/UI/SVDRRSlicer.ui", "../Resources/Icons/SVDRR.png", "../Resources/presets/geometry.json",
            "../Resources/requirements-slicer.txt"} <= set(resources)


def test_engine_package_holds_only_python_files():
    others = sorted(p.relative_to(ROOT).as_posix() for p in files_under(ROOT / "SVDRRLogic") if p.suffix != ".py")
    assert others == [], "data files inside SVDRRLogic would not be installed; put them in Resources/"


def test_only_the_module_sits_at_the_top_of_the_module_folder():
    # Slicer loads every .py file at the top of a module folder as a scripted module
    assert sorted(p.name for p in (ROOT / "SVDRRSlicer").glob("*.py")) == ["SVDRRSlicer.py"]


def test_top_level_cmakelists():
    text = TOP_CMAKE.read_text()
    values = cmake_lists(text)
    assert re.search(r"^project\(SVDRR\)", text, flags=re.M)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert values.get(key), f"{key} is not set"
    assert values["EXTENSION_DEPENDS"] == ["PyTorch"]
    order = ["cmake_minimum_required(", "project(SVDRR)", "set(EXTENSION_HOMEPAGE", "find_package(Slicer REQUIRED)",
             "include(${Slicer_USE_FILE})", "add_subdirectory(SVDRRSlicer)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(item) for item in order]
    assert positions == sorted(positions)


def test_extensions_index_entry():
    entry = json.loads(INDEX_ENTRY.read_text())
    top = cmake_lists(TOP_CMAKE.read_text())
    project = re.search(r"^project\((\w+)\)", TOP_CMAKE.read_text(), flags=re.M).group(1)
    assert INDEX_ENTRY.stem == project == "SVDRR"
    assert not project.lower().startswith("slicer")  # the Index refuses extension names starting with Slicer
    assert set(entry) <= set(SCHEMA_KEYS) and {"$schema", "category", "scm_url"} <= set(entry)
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_KEYS[key]), key
    assert entry["$schema"] == SCHEMA_URL
    assert entry["category"] == " ".join(top["EXTENSION_CATEGORY"]) and entry["category"] in KNOWN_CATEGORIES
    assert entry["build_dependencies"] == top["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://") and entry.get("enabled", True) is True
    repository = entry["scm_url"].removesuffix(".git").rstrip("/")
    assert repository.rsplit("/", 1)[1].startswith("Slicer")  # ... while the repository name should
    assert top["EXTENSION_HOMEPAGE"] == [repository]
    assert 1 <= entry.get("tier", 1) <= 5


def test_icon_url_points_at_the_icon_in_the_repository():
    from PIL import Image

    top = cmake_lists(TOP_CMAKE.read_text())
    repository = top["EXTENSION_HOMEPAGE"][0]
    (url,) = top["EXTENSION_ICONURL"]
    revision = json.loads(INDEX_ENTRY.read_text())["scm_revision"]
    prefix = f"{repository}/raw/{revision}/"
    assert url.startswith(prefix)
    icon = ROOT / url[len(prefix):]
    with Image.open(icon) as image:
        assert image.format == "PNG" and image.size == (128, 128)
    for screenshot in top["EXTENSION_SCREENSHOTURLS"]:
        assert screenshot.startswith(prefix) and screenshot.endswith(".png")
        assert (ROOT / screenshot[len(prefix):]).is_file(), f"{screenshot} does not exist in the repository"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    words = " ".join(text.split())
    assert words.startswith("Apache License Version 2.0, January 2004 http://www.apache.org/licenses/")
    assert "END OF TERMS AND CONDITIONS" in words and words.count("9. Accepting Warranty") == 1
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group()
            out[normalized(name)] = line
    return out


def pyproject_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, flags=re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


def test_slicer_requirements_follow_pyproject():
    engine = requirement_names(pyproject_dependencies())
    slicer_side = requirement_names((ROOT / "Resources" / "requirements-slicer.txt").read_text().splitlines())
    assert "torch" in engine and "torch" not in slicer_side  # torch comes through the PyTorch extension
    missing = sorted(set(engine) - {"torch"} - set(slicer_side))
    assert missing == [], f"pyproject.toml needs {missing}, which Slicer would not get"
    assert "psutil" in slicer_side  # the job runner's tree kill on Windows and for escaped descendants
    sys.path.insert(0, str(ROOT / "SVDRRSlicer"))
    try:
        from SVDRRSlicerLib.dependencies import TORCH_REQUIREMENT
    finally:
        sys.path.remove(str(ROOT / "SVDRRSlicer"))
    assert engine["torch"] == "torch" + TORCH_REQUIREMENT


# -- the installed layout, with real cmake ----------------------------------------------------------------------
STAND_INS = textwrap.dedent("""
    cmake_minimum_required(VERSION 3.16)
    project(SVDRRLayoutCheck NONE)
    set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.10/qt-scripted-modules")
    set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
    set(BUILD_TESTING OFF)
    set(_log "${CMAKE_BINARY_DIR}/placed.txt")
    file(WRITE "${_log}" "")
    # ctkMacroCompilePythonScript: <DESTINATION_DIR>/<file> from <SOURCE_DIR or current source dir>/<file>
    function(ctkMacroCompilePythonScript)
      cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
                            "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
      if(NOT MY_SOURCE_DIR)
        set(MY_SOURCE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
      endif()
      foreach(_file IN LISTS MY_SCRIPTS MY_RESOURCES)
        if(NOT EXISTS "${MY_SOURCE_DIR}/${_file}")
          message(FATAL_ERROR "${MY_TARGET_NAME}: no file ${MY_SOURCE_DIR}/${_file}")
        endif()
        get_filename_component(_dir "${MY_DESTINATION_DIR}/${_file}" DIRECTORY)
        file(COPY "${MY_SOURCE_DIR}/${_file}" DESTINATION "${_dir}")
        file(APPEND "${_log}" "${MY_DESTINATION_DIR}/${_file}\n")
      endforeach()
    endfunction()
    # slicerMacroBuildScriptedModule: checks that each file exists, then the CTK macro without SOURCE_DIR
    function(slicerMacroBuildScriptedModule)
      cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
      foreach(_file IN LISTS MY_SLICER_SCRIPTS MY_SLICER_RESOURCES)
        if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
          message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${_file}'")
        endif()
      endforeach()
      ctkMacroCompilePythonScript(TARGET_NAME ${MY_SLICER_NAME} SCRIPTS "${MY_SLICER_SCRIPTS}"
        RESOURCES "${MY_SLICER_RESOURCES}" DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
        INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR})
    endfunction()
    function(slicer_add_python_unittest)
    endfunction()
    add_subdirectory("@MODULE_DIR@" module)
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed: the installed layout is not checked")
    work = tmp_path_factory.mktemp("layout")
    (work / "src").mkdir()
    (work / "src" / "CMakeLists.txt").write_text(STAND_INS.replace("@MODULE_DIR@", (ROOT / "SVDRRSlicer").as_posix()))
    run = subprocess.run([cmake, "-S", str(work / "src"), "-B", str(work / "build")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return work / "build" / "lib" / "Slicer-5.10" / "qt-scripted-modules"


def test_installed_layout(installed, module_lists):
    placed = {p.relative_to(installed).as_posix() for p in files_under(installed)}
    expected = {item.removeprefix("../") for kind in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES")
                for item in module_lists[kind]}
    assert placed == expected  # nothing outside the scripted-modules folder, nothing dropped
    assert {"SVDRRSlicer.py", "Scripts/SVDRRWorker.py", "SVDRRLogic/__init__.py", "SVDRRLogic/io/ct.py",
            "Resources/UI/SVDRRSlicer.ui", "Resources/presets/geometry.json"} <= placed
    top_level_py = sorted(p for p in placed if "/" not in p and p.endswith(".py"))
    assert top_level_py == ["SVDRRSlicer.py"]  # the only file Slicer will load as a module


def test_worker_runs_from_the_installed_layout(installed, tmp_path):
    """The installed worker finds the engine and the presets next to it (not the checkout's copy)."""
    from SVDRRLogic.io import write_ct
    from SVDRRLogic.jobs import FINISHED, start_job, write_job_file
    from SVDRRLogic.phantoms import chest_phantom

    ct = write_ct(tmp_path / "ct.nrrd", chest_phantom(shape=(24, 48, 48), spacing=(7.4, 7.4, 13.4)))
    spec = {"task": "render_orbit", "ct": str(ct), "geometry": {"preset": "x2ct", "detector": [16, 16],
                                                                   "pixel": [20, 20]},
            "views": [[0, 0]], "output_dir": str(tmp_path / "out"), "device": "cpu"}
    job = start_job([sys.executable, str(installed / "Scripts" / "SVDRRWorker.py"),
                     str(write_job_file(spec, tmp_path / "job.json"))], cwd=tmp_path)
    events = job.wait(timeout=120)
    assert job.state == FINISHED, job.error
    engine = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("SVDRR engine")]
    assert engine and str(installed / "SVDRRLogic") in engine[0]
