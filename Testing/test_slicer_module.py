"""Static checks of the Slicer module, which cannot run here (no Qt, no slicer.app, no ScriptedLoadableModule).

What Slicer would only reveal at run time is checked from the source: the module parses with Python 3.10 and 3.12
grammar; every ``.ui.<name>`` it uses exists in the .ui; every widget class is a real designer class; every
``slicer.util`` function exists in the ``slicer/util.py`` that ``slicer-core`` ships; every MRML class and event it
names exists in slicer-core; every ``SlicerParameterName`` maps to a parameter of the ``parameterNodeWrapper`` class
with a type that parameterNodeWrapper can bind to that widget; nothing that needs torch is imported at the top of
the module; and the dependency rule of DESIGN.md section 1 holds for every file of ``SVDRRLogic``.
"""
import ast
import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SVDRRSlicer" / "SVDRRSlicer.py"
WORKER = ROOT / "SVDRRSlicer" / "Scripts" / "SVDRRWorker.py"
LIB = ROOT / "SVDRRSlicer" / "SVDRRSlicerLib"
UI = ROOT / "Resources" / "UI" / "SVDRRSlicer.ui"
ENGINE = ROOT / "SVDRRLogic"
SLICER_SIDE = sorted((ROOT / "SVDRRSlicer").rglob("*.py"))

# Widget classes the .ui may use. Qt's own designer widgets (QtWidgets, created by QUiLoader without any plugin);
# CTK widgets that CTK's designer plugins register and Slicer ships (CTK Libs/Widgets/Plugins: ctkCollapsibleButton,
# ctkSliderWidget, ctkPathLineEdit, ctkDirectoryButton, ...); Slicer's MRML widgets from its designer plugins
# (Libs/MRML/Widgets/DesignerPlugins: qMRMLWidget, qMRMLNodeComboBox, ...). A class outside this list (a typo, a
# Qt class that is not a widget, a widget from an extension we do not depend on) would make loadUI fail at run time.
QT_WIDGETS = {"QWidget", "QFrame", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QComboBox",
              "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QProgressBar", "QSlider",
              "QGroupBox", "QTabWidget", "QStackedWidget", "QScrollArea", "QListWidget", "QTableWidget"}
CTK_WIDGETS = {"ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkSliderWidget", "ctkRangeWidget",
               "ctkDoubleSpinBox", "ctkPathLineEdit", "ctkDirectoryButton", "ctkCheckBox", "ctkComboBox",
               "ctkCheckablePushButton", "ctkColorPickerButton", "ctkMenuButton"}
MRML_WIDGETS = {"qMRMLWidget", "qMRMLNodeComboBox", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget",
                "qMRMLSubjectHierarchyComboBox", "qMRMLSubjectHierarchyTreeView", "qMRMLThreeDView",
                "qMRMLSliceWidget"}
ALLOWED_WIDGETS = QT_WIDGETS | CTK_WIDGETS | MRML_WIDGETS
ALLOWED_LAYOUTS = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}

# Which parameter types parameterNodeWrapper can bind to which widget (Slicer 5.10
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, the canRepresent() of each connector).
CONNECTABLE = {
    "QCheckBox": {"bool"}, "ctkCheckBox": {"bool"},
    "QSpinBox": {"int"}, "QSlider": {"int"},
    "QDoubleSpinBox": {"float", "int"}, "ctkSliderWidget": {"float", "int"}, "ctkDoubleSpinBox": {"float", "int"},
    "qMRMLSliderWidget": {"float", "int"}, "qMRMLSpinBox": {"float", "int"},
    "QComboBox": {"choice", "enum"}, "ctkComboBox": {"choice", "enum"},
    "QLineEdit": {"str"}, "QLabel": {"str"},
    "ctkPathLineEdit": {"Path"}, "ctkDirectoryButton": {"Path"},
    "qMRMLNodeComboBox": {"node"},
}
NEEDS_RANGE = {"ctkSliderWidget", "qMRMLSliderWidget", "QSlider"}  # connectors raise for unbounded values
# Attribute names parameterNodeWrapper adds to the class (wrapper.py, _processClass and _initMethod).
RESERVED = {"allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
            "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver", "RemoveObserver",
            "Modified", "parameterNode"}
# Names of slicer.util added after Slicer 5.10 (present in slicer-core, which copies main's util.py, but absent
# from the 5.10 branch's Base/Python/slicer/util.py): using them would break the oldest supported Slicer.
UTIL_NEWER_THAN_5_10 = {"executePythonModule", "LazyImport", "_startAsyncProcessHandling", "_temporaryNormalCursor"}
# What the module imports from Slicer packages that slicer-core lacks, as found in Slicer 5.10's sources:
# slicer/ScriptedLoadableModule.py, slicer/parameterNodeWrapper/__init__.py (+ its submodules' __all__), slicer/i18n.py.
SLICER_APP_ONLY = {
    "slicer.ScriptedLoadableModule": {"ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                                      "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"},
    "slicer.parameterNodeWrapper": {"parameterNodeWrapper", "parameterPack", "WithinRange", "Minimum", "Maximum",
                                    "Choice", "Default", "Decimals", "SingleStep", "NotEmpty"},
    "slicer.i18n": {"tr", "translate"},
}


def parse(path: Path, version=(3, 12)) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=version)


@pytest.fixture(scope="module")
def tree():
    return parse(MODULE)


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI).getroot()


def ui_widgets(root) -> dict:
    """name -> class of every widget in the .ui, the top-level one included."""
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def dotted(node) -> str | None:
    """'a.b.c' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def top_level_imports(tree: ast.Module) -> list[str]:
    """Modules imported when the file is imported: module-level statements (also inside top-level if/try)."""
    found = []
    for node in _module_level_import_nodes(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif node.level == 0:
            found.append(node.module)
    return found


# -- grammar ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SLICER_SIDE, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("version", [(3, 10), (3, 12)], ids=["py3.10", "py3.12"])
def test_parses_with_python_310_and_312_grammar(path, version):
    parse(path, version)
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


# -- the .ui ---------------------------------------------------------------------------------------------------
def test_every_ui_attribute_used_exists_in_the_ui(tree, ui):
    names = set(ui_widgets(ui)) - {ui.find("widget").get("name")}  # childWidgetVariables skips the top widget
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    assert used, "the module uses no .ui widgets?"
    assert sorted(used - names) == []
    assert {"azimuthSliderWidget", "renderButton", "renderOrbitButton", "cancelOrbitButton", "orbitProgressBar",
            "inputKindLabel", "deviceLabel"} <= used
    assert {"reconstructButton", "cancelReconstructionButton", "reconstructionProgressBar", "reconstructionStatusLabel",
            "reconstructionModelStatusLabel", "reconstructionInput1Label", "reconstructionInput2Label",
            "reconstructionAzimuth1SpinBox", "reconstructionElevation2SpinBox"} <= used


def test_ui_uses_only_real_designer_classes(ui):
    widgets = ui_widgets(ui)
    assert sorted({c for c in widgets.values()} - ALLOWED_WIDGETS) == []
    assert sorted({lay.get("class") for lay in ui.iter("layout")} - ALLOWED_LAYOUTS) == []
    declared = {c.findtext("class"): c for c in ui.iter("customwidget")}
    custom = {c for c in widgets.values() if not c.startswith("Q")}
    assert sorted(custom - set(declared)) == [], "custom widgets must be declared in <customwidgets>"
    for name, element in declared.items():
        assert element.findtext("header") == f"{name}.h"
    names = list(widgets)
    assert len(names) == len(set(names)) and all(names), "widget names must be unique and non-empty"


def test_ui_top_widget_and_scene_connections(ui):
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == ui.findtext("class") == "SVDRRSlicer"
    selectors = {n for n, c in ui_widgets(ui).items() if c == "qMRMLNodeComboBox"}
    connected = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                 for c in ui.iter("connection")}
    expected = {("SVDRRSlicer", "mrmlSceneChanged(vtkMRMLScene*)", s, "setMRMLScene(vtkMRMLScene*)")
                for s in selectors}
    assert selectors and expected <= connected


def test_colour_radiographs_can_be_chosen_where_an_xray_is_read(ui):
    """Slicer loads an RGB PNG/JPEG radiograph as a vector volume, which a selector of scalar volumes alone hides
    (showChildNodeTypes is off, to hide label maps); DRR outputs stay scalar. (The parameters' annotations must
    agree: the parameter node sets a bound selector's types from them.)"""
    def node_types(name):
        (widget,) = [w for w in ui.iter("widget") if w.get("name") == name]
        (prop,) = [p for p in widget.findall("property") if p.get("name") == "nodeTypes"]
        return [t.text for t in prop.iter("string")]

    for name in ("inputVolumeSelector", "synthesisInputSelector", "reconstructionInput1Selector",
                 "reconstructionInput2Selector"):
        assert node_types(name) == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"], name
    assert node_types("outputVolumeSelector") == ["vtkMRMLScalarVolumeNode"]


def parameter_class(tree):
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SVDRRSlicerParameterNode"]
    assert [dotted(d) for d in cls.decorator_list] == ["parameterNodeWrapper"]
    return cls


def node_classes(annotation) -> list[str]:
    """The MRML classes of a node annotation (``vtkMRMLX``, ``Optional[...]``, ``Union[vtkMRMLX, vtkMRMLY]``)."""
    if isinstance(annotation, ast.Subscript) and dotted(annotation.value) in ("Optional", "typing.Optional"):
        return node_classes(annotation.slice)
    if isinstance(annotation, ast.Subscript) and dotted(annotation.value) in ("Union", "typing.Union"):
        return [c for e in annotation.slice.elts for c in node_classes(e)]
    name = (dotted(annotation) or "").split(".")[-1]
    return [name] if name.startswith("vtkMRML") else []


def describe_annotation(annotation) -> tuple[str, list[ast.expr]]:
    """(kind, extra annotations) of a parameter: kind is bool/int/float/str/Path/node/choice."""
    extras = []
    if isinstance(annotation, ast.Subscript) and dotted(annotation.value) in ("Annotated", "typing.Annotated"):
        base, *extras = annotation.slice.elts
    else:
        base = annotation
    if isinstance(base, ast.Subscript) and dotted(base.value) in ("Optional", "typing.Optional"):
        base = base.slice
    if node_classes(base):
        return "node", extras
    name = dotted(base) or ""
    if name in ("pathlib.Path", "Path"):
        return "Path", extras
    if name == "str" and any(isinstance(e, ast.Call) and dotted(e.func) == "Choice" for e in extras):
        return "choice", extras
    return name, extras


def test_slicer_parameter_names_map_to_bindable_parameters(tree, ui):
    cls = parameter_class(tree)
    params = {n.target.id: n for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert not RESERVED & set(params), "parameter names collide with parameterNodeWrapper's own attributes"
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property (stdset=0)"
                bound[prop.findtext("string")] = widget
    assert sorted(set(bound) - set(params)) == [], "SlicerParameterName without a parameter"
    assert sorted(set(params) - set(bound)) == [], "parameter without a widget"
    for name, widget in bound.items():
        kind, extras = describe_annotation(params[name].annotation)
        wclass = widget.get("class")
        assert kind in CONNECTABLE[wclass], f"{name}: a {kind} parameter cannot be bound to a {wclass}"
        if wclass in NEEDS_RANGE:
            assert any(isinstance(e, ast.Call) and dotted(e.func) == "WithinRange" for e in extras), name
        if wclass == "qMRMLNodeComboBox":  # the parameter node sets the selector's types from the annotation
            classes = node_classes(params[name].annotation)
            node_types = next(p for p in widget.findall("property") if p.get("name") == "nodeTypes")
            types = [x.text for x in node_types.iter("string")]
            assert types == classes, f"{name}: selector types {types} differ from {classes}"


def module_constants(tree) -> dict:
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def test_choice_defaults_are_among_the_choices(tree):
    constants = module_constants(tree)
    presets = [k for k in json.loads((ROOT / "Resources/presets/geometry.json").read_text()) if not k.startswith("_")]
    constants.setdefault("PRESET_NAMES", presets)
    # the module reads the models of the catalogue at import time (catalogueModels): the same lists here
    models = json.loads((ROOT / "Resources/models.json").read_text())["models"]

    def of_kinds(*kinds):
        return sorted((n for n, e in models.items() if e.get("kind") in kinds),
                      key=lambda n: not models[n].get("demo", False))

    svdrr_models = of_kinds("svdrr")
    assert svdrr_models, "the catalogue lists no SV-DRR model for the novel-view panel"
    constants.setdefault("SVDRR_MODEL_NAMES", svdrr_models)
    # the reconstruction panel lists each method's demonstration model first, in the catalogue yet or not
    demo_models = list(constants["RECONSTRUCTION_DEFAULT_MODELS"].values())
    constants.setdefault("RECONSTRUCTION_METHODS", list(constants["RECONSTRUCTION_DEFAULT_MODELS"]))
    constants.setdefault("RECONSTRUCTION_MODEL_NAMES", list(dict.fromkeys(demo_models + of_kinds("dvg", "patch-edm"))))
    computed_defaults = {"DEFAULT_PRESET": "svdrr-lidc", "DEFAULT_SVDRR_MODEL": svdrr_models[0],
                         "DEFAULT_RECONSTRUCTION_MODEL": demo_models[0]}
    checked = 0
    for node in parameter_class(tree).body:
        if not isinstance(node, ast.AnnAssign):
            continue
        kind, extras = describe_annotation(node.annotation)
        if kind != "choice" or node.value is None:
            continue
        (choice,) = [e for e in extras if isinstance(e, ast.Call) and dotted(e.func) == "Choice"]
        arg = choice.args[0]
        choices = constants[arg.id] if isinstance(arg, ast.Name) else ast.literal_eval(arg)
        default = constants.get(node.value.id) if isinstance(node.value, ast.Name) else ast.literal_eval(node.value)
        if isinstance(node.value, ast.Name) and node.value.id in computed_defaults:
            default = computed_defaults[node.value.id]
        assert default in choices, f"{node.target.id}: default {default!r} not in {choices}"
        checked += 1
    assert checked >= 7
    assert "svdrr-lidc" in presets
    assert set(constants["HU_MODELS"]) == {"physical", "diffdrr"}


# -- Slicer APIs -----------------------------------------------------------------------------------------------
def test_reconstruction_methods_match_the_engine(tree):
    """The panel's method labels and the model each proposes are the engine's (``SVDRRLogic.reconstruct``)."""
    pytest.importorskip("torch")
    pytest.importorskip("slicer", reason="SVDRRLogic.session_reconstruction needs slicer-core")
    from SVDRRLogic.reconstruct import DEFAULT_MODELS
    from SVDRRLogic.session_reconstruction import METHOD_LABELS

    panel = module_constants(tree)["RECONSTRUCTION_DEFAULT_MODELS"]
    assert panel == {METHOD_LABELS[method]: model for method, model in DEFAULT_MODELS.items()}


def slicer_core_util() -> Path:
    spec = importlib.util.find_spec("slicer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("slicer-core is not installed (pip install slicer-core): cannot check slicer.util names")
    util = Path(next(iter(spec.submodule_search_locations))) / "util.py"
    if not util.is_file():
        pytest.skip(f"the installed slicer package has no util.py ({util})")
    return util


def test_every_slicer_util_function_exists_in_slicer_core(tree):
    util = slicer_core_util()
    available = {n.name for n in parse(util).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"loadUI", "childWidgetVariables", "pip_install", "VTKObservationMixin"} <= available
    used = set()
    for node in ast.walk(tree):
        name = dotted(node) if isinstance(node, ast.Attribute) else None
        if name and name.startswith("slicer.util."):
            used.add(name.split(".")[2])
        if isinstance(node, ast.ImportFrom) and node.module == "slicer.util":
            used.update(alias.name for alias in node.names)
    assert {"loadUI", "errorDisplay", "confirmOkCancelDisplay", "pip_install", "tryWithErrorDisplay"} <= used
    assert sorted(used - available) == []
    assert sorted(used & UTIL_NEWER_THAN_5_10) == []


def test_mrml_classes_and_events_exist_in_slicer_core(tree):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' module is not slicer-core")
    names = set()
    for node in ast.walk(tree):
        name = dotted(node) if isinstance(node, ast.Attribute) else None
        if name and name.startswith("slicer.vtkMRML"):
            names.add(".".join(name.split(".")[1:3]))
        if isinstance(node, ast.ImportFrom) and node.module == "slicer":
            names.update(alias.name for alias in node.names)
    assert "vtkMRMLMarkupsNode.PointEndInteractionEvent" in names
    for name in names:
        obj = slicer
        for part in name.split("."):
            assert hasattr(obj, part), f"slicer.{name} does not exist in slicer-core"
            obj = getattr(obj, part)


def test_imports_from_application_only_slicer_packages_exist(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in SLICER_APP_ONLY:
            missing = {a.name for a in node.names} - SLICER_APP_ONLY[node.module]
            assert not missing, f"{node.module} has no {missing}"


def test_module_follows_the_template(tree):
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    bases = {name: [dotted(b) for b in cls.bases] for name, cls in classes.items()}
    assert bases["SVDRRSlicer"] == ["ScriptedLoadableModule"]
    assert bases["SVDRRSlicerWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["SVDRRSlicerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["SVDRRSlicerTest"] == ["ScriptedLoadableModuleTest"]
    init = next(f for f in classes["SVDRRSlicer"].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assigned = {dotted(t) for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets}
    assert {"self.parent.title", "self.parent.categories", "self.parent.contributors", "self.parent.helpText",
            "self.parent.acknowledgementText"} <= assigned
    connects = [n for n in ast.walk(init) if isinstance(n, ast.Call) and dotted(n.func) == "slicer.app.connect"]
    assert [ast.literal_eval(c.args[0]) for c in connects] == ["startupCompleted()"]
    widget_methods = {f.name for f in classes["SVDRRSlicerWidget"].body if isinstance(f, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "onSceneStartClose", "onSceneEndClose", "initializeParameterNode",
            "setParameterNode"} <= widget_methods
    test_methods = {f.name for f in classes["SVDRRSlicerTest"].body if isinstance(f, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= test_methods and any(m.startswith("test_") for m in test_methods)


def test_sample_data_registration_uses_a_custom_loader(tree):
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "registerSampleData"]
    (call,) = [n for n in ast.walk(func) if isinstance(n, ast.Call)
               and dotted(n.func) == "SampleData.SampleDataLogic.registerCustomSampleDataSource"]
    keywords = {k.arg: k.value for k in call.keywords}
    # the Slicer 5.10 signature (Modules/Scripted/SampleData/SampleData.py)
    assert set(keywords) <= {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                             "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums"}
    assert dotted(keywords["customDownloader"]) == "loadChestPhantomSample"
    thumbnail = ROOT / "Resources" / "Icons" / "SVDRRChestPhantom.png"
    assert thumbnail.is_file()


def test_nothing_is_installed_at_import_time(tree):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            name = dotted(call.func) or ""
            assert not name.endswith(("pip_install", "installTorch", "ensureDependencies")), name


# -- import rules ----------------------------------------------------------------------------------------------
def engine_module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def engine_graph() -> dict[str, set[str]]:
    """Module-level imports of every SVDRRLogic module (relative imports resolved)."""
    graph = {}
    for path in sorted(ENGINE.rglob("*.py")):
        name = engine_module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for imported in _module_level_import_nodes(parse(path)):
            if isinstance(imported, ast.Import):
                deps.update(alias.name for alias in imported.names)
                continue
            base = imported.module or ""
            if imported.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - imported.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            deps.add(base)
            deps.update(f"{base}.{alias.name}" for alias in imported.names)  # "from . import x" imports x
        graph[name] = deps
    return graph


def _module_level_import_nodes(tree):
    """Import statements run when the file is imported (module level, also inside top-level if/try)."""
    out = []

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))
    visit(tree.body)
    return out


def needs_torch(module: str, graph: dict, seen=None) -> bool:
    """Whether importing ``module`` imports torch (importing a.b.c first runs a/__init__ and a/b/__init__)."""
    seen = set() if seen is None else seen
    if module in seen:
        return False
    seen.add(module)
    if module == "torch" or module.startswith("torch."):
        return True
    parts = module.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(any(needs_torch(dep, graph, seen) for dep in graph.get(m, ())) for m in chain)


def test_engine_import_graph_is_understood():
    graph = engine_graph()
    assert needs_torch("SVDRRLogic.renderer", graph)
    assert not needs_torch("json", graph)


@pytest.mark.parametrize("path", [MODULE, *sorted(LIB.rglob("*.py"))], ids=lambda p: p.name)
def test_slicer_side_never_imports_torch_at_the_top(path):
    graph = engine_graph()
    stdlib = set(sys.stdlib_module_names)
    for module in top_level_imports(parse(path)):
        root = module.split(".")[0]
        assert root in stdlib | {"qt", "ctk", "vtk", "slicer", "SVDRRLogic", "SVDRRSlicerLib"}, module
        assert not needs_torch(module, graph), f"{path.name} imports {module} at the top, which needs torch"


def test_worker_is_plain_python():
    tree = parse(WORKER)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"qt", "ctk", "slicer", "vtk", "PythonQt"}, name
    assert all(not needs_torch(m, engine_graph()) for m in top_level_imports(tree))
    tasks = next(n for n in tree.body if isinstance(n, ast.Assign) and dotted(n.targets[0]) == "TASKS")
    assert {"render_orbit", "synthesize_views", "reconstruct_ct"} <= {ast.literal_eval(k) for k in tasks.value.keys}


FORBIDDEN_IN_ENGINE = ("qt", "ctk", "PythonQt", "SVDRRSlicer", "SVDRRSlicerLib", "training")
APP_ATTRIBUTES = ("slicer.app", "slicer.modules", "slicer.mrmlScene", "slicer.util")


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: str(p.relative_to(ENGINE)))
def test_dependency_rule(path):
    """DESIGN.md section 1: SVDRRLogic never imports qt, ctk, slicer.app, SVDRRSlicer or training; only the MRML
    bridge (mrml*) imports slicer, and it never reaches for the application (it takes the scene as an argument)."""
    tree = parse(path, (3, 10))
    bridge = path.parent == ENGINE and path.name.startswith("mrml")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
            if node.module == "slicer":
                names += [f"slicer.{a.name}" for a in node.names]
        else:
            name = dotted(node) if isinstance(node, ast.Attribute) else None
            assert not (name and name.startswith(APP_ATTRIBUTES)), f"{path.name} uses {name}"
            continue
        for name in names:
            root = name.split(".")[0]
            assert root not in FORBIDDEN_IN_ENGINE, f"{path.name} imports {name}"
            assert name not in ("slicer.app", "slicer.util", "slicer.modules"), f"{path.name} imports {name}"
            if root == "slicer":
                assert bridge, f"{path.name} imports slicer; only the MRML bridge (mrml*) may"


# -- the Qt-free dependency helper -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dependencies():
    sys.path.insert(0, str(ROOT / "SVDRRSlicer"))
    try:
        from SVDRRSlicerLib import dependencies
    finally:
        sys.path.remove(str(ROOT / "SVDRRSlicer"))
    return dependencies


def test_requirement_parsing(dependencies, tmp_path):
    assert dependencies.parse("pylibjpeg-libjpeg>=2.1") == ("pylibjpeg-libjpeg", [(">=", "2.1")])
    assert dependencies.parse("monai[fire] >=1.3, <2 ; python_version>'3.8'") == ("monai", [(">=", "1.3"),
                                                                                        ("<", "2")])
    assert dependencies.parse("tqdm") == ("tqdm", [])
    with pytest.raises(ValueError):
        dependencies.parse("bad name>=1")
    file = tmp_path / "r.txt"
    file.write_text("# comment\n\nnumpy>=1.24  # why\n--extra-index-url x\npsutil\n")
    assert dependencies.read_requirements(file) == ["numpy>=1.24", "psutil"]
    assert dependencies.normalize("Pylibjpeg_LibJPEG") == "pylibjpeg-libjpeg"


@pytest.mark.parametrize("version, spec, ok", [("1.10.0", ">=1.9", True), ("1.9", ">=1.10", False),
                                               ("2.0.0rc1", ">=1.0", True), ("2.5", "==2.*", True),
                                               ("3.1", "==2.*", False), ("2.2", "~=2.1", True),
                                               ("3.0", "~=2.1", False), ("1.0", "!=1.0", False)])
def test_version_comparison(dependencies, version, spec, ok, monkeypatch):
    op, wanted = dependencies.parse("x" + spec)[1][0]
    assert dependencies.satisfies(version, [(op, wanted)]) is ok
    assert dependencies._compare(version, op, wanted) is ok  # the fallback without 'packaging' agrees


def test_install_plan_never_touches_slicer_packages(dependencies):
    to_install, warnings = dependencies.plan(["numpy>=999", "surely-not-installed-svdrr-pkg>=1", "pytest>=1"])
    assert to_install == ["surely-not-installed-svdrr-pkg>=1"]
    assert len(warnings) == 1 and "numpy" in warnings[0] and "does not replace" in warnings[0]
    assert dependencies.torch_is_met(">=1.0") and not dependencies.torch_is_met(">=999")
    assert dependencies.is_met("pytest>=1") and not dependencies.is_met("pytest<1")
