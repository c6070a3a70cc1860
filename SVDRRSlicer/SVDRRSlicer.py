"""SVDRR: digitally reconstructed radiographs of a CT on a virtual C-arm, live; orbits as sequences.

Scripted module in the ExtensionWizard layout: module, parameter node, widget, logic adapter and test in one file.
The widget only wires widgets, timers and dialogs; the work is done by the Qt-free engine ``SVDRRLogic`` (through
``SVDRRLogic.session`` and ``SVDRRLogic.jobs``) with ``slicer.mrmlScene`` passed in.

Import rules (checked by Testing/test_slicer_module.py): at the top of this file only Slicer, Qt, VTK and the
standard library are imported. ``SVDRRLogic`` needs torch, which may not be installed when Slicer loads the module
(it is installed on first use, after asking), so every engine import happens inside the method that needs it.
Long jobs (orbits, novel views, CT reconstructions) run in a separate process (``Scripts/SVDRRWorker.py`` under
``PythonSlicer``) polled by a timer, so Slicer stays responsive and Cancel ends the whole process tree.
"""
import collections
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER_SCRIPT = os.path.join(MODULE_DIR, "Scripts", "SVDRRWorker.py")
SAMPLE_CATEGORY = "SVDRR"
SAMPLE_NAME = "SVDRRChestPhantom"
PREVIEW_INTERVAL_MS = 50   # live preview: at most one reduced render per interval while something moves
SETTLE_INTERVAL_MS = 50    # full-resolution render this long after the last change (debounce)
JOB_POLL_MS = 200
DEVICES = ["auto", "cpu", "cuda"]
HU_MODELS = ["physical", "diffdrr"]
ORBIT_FORMATS = ["nrrd", "png", "dcm", "nii.gz", "mha"]


def _addEngineToPath():
    """Make ``SVDRRLogic`` and ``SVDRRSlicerLib`` importable: they sit next to this file once installed, and the
    engine sits one folder up in a source checkout (module folder added as an additional module path)."""
    for folder in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(folder, "SVDRRLogic", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)  # the engine shipped with the module wins over any other copy
            break
    if MODULE_DIR not in sys.path:
        sys.path.append(MODULE_DIR)


_addEngineToPath()


def resourcePath(*parts):
    """A file of ``Resources/``: next to this file when installed, at the top of the repository in a checkout."""
    for base in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        candidate = os.path.join(base, "Resources", *parts)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(MODULE_DIR, "Resources", *parts)


def geometryPresets():
    """The C-arm presets of ``Resources/presets/geometry.json`` (plain JSON: readable before torch exists)."""
    try:
        with open(resourcePath("presets", "geometry.json"), encoding="utf-8") as f:
            presets = json.load(f)
    except (OSError, ValueError) as exc:
        logging.error(f"SVDRR: cannot read the geometry presets: {exc}")
        return {}
    return {name: value for name, value in presets.items() if not name.startswith("_")}


PRESETS = geometryPresets()
PRESET_NAMES = list(PRESETS) or ["svdrr-lidc"]
DEFAULT_PRESET = "svdrr-lidc" if "svdrr-lidc" in PRESET_NAMES else PRESET_NAMES[0]


def catalogueModels(kinds):
    """Names of the models of ``Resources/models.json`` whose kind is in ``kinds`` (plain JSON: readable before
    torch exists), demonstration models (``"demo": true``) first, since they can ship with the extension."""
    try:
        with open(resourcePath("models.json"), encoding="utf-8") as f:
            models = json.load(f).get("models", {})
    except (OSError, ValueError, AttributeError) as exc:
        logging.error(f"SVDRR: cannot read the model catalogue: {exc}")
        return []
    names = [name for name, entry in models.items() if isinstance(entry, dict) and entry.get("kind") in kinds]
    return sorted(names, key=lambda name: not models[name].get("demo", False))


SVDRR_MODEL_NAMES = catalogueModels(("svdrr",)) or ["svdrr-dit-fb-256"]
DEFAULT_SVDRR_MODEL = SVDRR_MODEL_NAMES[0]
# The reconstruction methods as the panel names them, each with the model proposed when it is chosen: its
# demonstration model (SVDRRLogic.reconstruct.DEFAULT_MODELS; Testing/test_slicer_module.py checks they agree).
# Those are listed even before the catalogue has them: the model status line then says what is missing.
RECONSTRUCTION_DEFAULT_MODELS = {"DVG-Diffusion": "dvg-demo-64", "3D patch EDM": "patch-edm-demo-64"}
RECONSTRUCTION_METHODS = list(RECONSTRUCTION_DEFAULT_MODELS)
RECONSTRUCTION_MODEL_NAMES = list(dict.fromkeys([*RECONSTRUCTION_DEFAULT_MODELS.values(),
                                                 *catalogueModels(("dvg", "patch-edm"))]))
DEFAULT_RECONSTRUCTION_MODEL = RECONSTRUCTION_MODEL_NAMES[0]


#: What the panel knows about one X-ray of the reconstruction: whether it can be used, whether its view must be
#: entered (SVDRR stored none on it), and the status line that says so.
ReconstructionInput = collections.namedtuple("ReconstructionInput", ["usable", "needsView", "message"])


def _outputFolder():
    """Default folder for orbits and exports: an SVDRR folder in Slicer's default data folder."""
    return pathlib.Path(slicer.app.defaultScenePath) / "SVDRR"


#
# SVDRRSlicer
#


class SVDRRSlicer(ScriptedLoadableModule):
    """Module description. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SVDRR")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["SVDRR contributors"]
        iconPath = resourcePath("Icons", "SVDRR.png")  # Resources/ is not next to this file in a source checkout
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)
        self.parent.helpText = _("""
Digitally reconstructed radiographs (DRRs) of a CT on a virtual C-arm, rendered live: move the azimuth and
elevation sliders, or drag the yellow source point in the 3D view, and the DRR follows (a reduced preview while
moving, full resolution when you stop). The DRR appears in the red slice view and on the detector plate in the 3D
view. "Render orbit" renders a whole set of views in a separate process and imports them as a sequence (browse it
with the Sequences module); "Export DRR" writes the current DRR as PNG, DICOM or NRRD.
"Novel views" synthesizes new C-arm views of one X-ray (a radiograph or a DRR) with an SV-DRR diffusion model, once a
model is downloaded (svdrr models download NAME) or a model folder is chosen; several views become a sequence.
"Reconstruct CT" makes a CT from one or two X-rays with DVG-Diffusion or a 3D patch EDM; the CT appears with volume
rendering, over the CT selected at the top when there is one.
Angles follow the DICOM positioner convention: azimuth LAO positive, elevation cranial positive, (0, 0) is a PA view.
Every image SVDRR makes is marked synthetic: DRRs are simulations and synthesized views are plausible guesses of a
model, not measurements, and reconstructed CTs are plausible volumes, not scans; none is for diagnosis.
""")
        self.parent.acknowledgementText = _("""
SVDRR reimplements the view convention of SV-DRR (Xie et al.), DVG-Diffusion and a 3D patch EDM; it is built on
3D Slicer, PyTorch and the SlicerPyTorch extension. The module layout follows Slicer's ExtensionWizard template.
""")
        # Register the sample data after startup (SampleData must be loaded first)
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def registerSampleData():
    """Add SVDRR's chest phantom to the Sample Data module.

    The phantom is generated, not downloaded: SampleData calls ``customDownloader`` when the user clicks the sample,
    and that builds the CT with ``SVDRRLogic.phantoms.chest_phantom``. SampleData still requires a URI and a file
    name per sample; the URI below is never fetched through the GUI. ``SampleData.downloadSample(SAMPLE_NAME)``
    bypasses ``customDownloader`` (it always downloads), so scripts call ``SVDRRSlicerLogic().loadChestPhantom()``.
    """
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=resourcePath("Icons", "SVDRRChestPhantom.png"),
        uris="svdrr://generated/chest-phantom",
        fileNames="SVDRRChestPhantom.nrrd",
        nodeNames=SAMPLE_NAME,
        customDownloader=loadChestPhantomSample,
    )


def loadChestPhantomSample(source=None):
    """SampleData's ``customDownloader``: generate the chest phantom and show it."""
    with slicer.util.tryWithErrorDisplay(_("Failed to create the SVDRR chest phantom."), waitCursor=True):
        logic = SVDRRSlicerLogic()
        if not logic.ensureDependencies():
            return None
        node = logic.loadChestPhantom()
        slicer.util.setSliceViewerLayers(background=node, fit=True)
        return node
    return None


#
# SVDRRSlicerParameterNode
#


@parameterNodeWrapper
class SVDRRSlicerParameterNode:
    """The module's settings, saved with the scene.

    inputVolume - CT (3D, Hounsfield units) or X-ray (2D) to work on; never modified.
    geometryPreset - C-arm preset; choosing one copies its distances and detector into the fields below.
    sourceAxisDistance, sourceDetectorDistance - SAD and SDD in mm.
    detectorColumns, detectorRows, pixelSize - detector size in pixels and (square) pixel side in mm.
    device, huModel - where DRRs are computed and how HU become attenuation.
    azimuth, elevation - C-arm angles in degrees (LAO +, cranial +).
    live, previewScale - re-render while moving; the preview has previewScale times fewer pixels per side.
    drrVolume - output volume of the DRR (None: a new one is created).
    orbitViews, orbitFormat, orbitOutputDirectory - what an orbit renders and where its files go.
    exportPath - file the DRR is exported to (format from the extension).
    synthesisInput - X-ray (2D volume, e.g. a DRR) whose novel views are synthesized; never modified.
    synthesisModel, synthesisModelFolder - catalogue SV-DRR model, or a model folder ('.' or empty: none) that wins.
    synthesisAzimuth, synthesisElevation - the target view when synthesisViews is empty.
    synthesisViews - several target views: arc:..., hemisphere:N or "AZ,EL; AZ,EL; ..." (imported as a sequence).
    synthesisSteps, synthesisGuidance, synthesisSeed - denoising steps, guidance scale, noise seed.
    synthesisOutputDirectory - each synthesis is written into a time-stamped sub-folder of this folder.
    reconstructionMethod - "DVG-Diffusion" or "3D patch EDM"; choosing one proposes its demonstration model.
    reconstructionInput1, reconstructionInput2 - the X-rays (2D volumes) of the CT reconstruction, the second one
        optional; never modified.
    reconstructionAzimuth1/2, reconstructionElevation1/2 - the view of an X-ray that has no view stored by SVDRR.
    reconstructionModel, reconstructionModelFolder - catalogue model, or a model folder ('.' or empty: none) that wins.
    reconstructionSteps, reconstructionSeed - denoising steps (0: the model's own number) and noise seed.
    reconstructionOutputDirectory - each reconstruction is written into a time-stamped sub-folder of this folder.
    """

    inputVolume: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]]
    geometryPreset: Annotated[str, Choice(PRESET_NAMES)] = DEFAULT_PRESET
    sourceAxisDistance: Annotated[float, WithinRange(10.0, 10000.0)] = 1650.0
    sourceDetectorDistance: Annotated[float, WithinRange(11.0, 20000.0)] = 1800.0
    detectorColumns: Annotated[int, WithinRange(2, 8192)] = 512
    detectorRows: Annotated[int, WithinRange(2, 8192)] = 512
    pixelSize: Annotated[float, WithinRange(0.001, 100.0)] = 0.7
    device: Annotated[str, Choice(DEVICES)] = "auto"
    huModel: Annotated[str, Choice(HU_MODELS)] = "physical"
    azimuth: Annotated[float, WithinRange(-180.0, 180.0)] = 0.0
    elevation: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0
    live: bool = True
    previewScale: Annotated[int, WithinRange(1, 16)] = 4
    drrVolume: Optional[vtkMRMLScalarVolumeNode]
    orbitViews: str = "arc:-90:90:5"
    orbitFormat: Annotated[str, Choice(ORBIT_FORMATS)] = "nrrd"
    orbitOutputDirectory: Annotated[pathlib.Path, Default(generator=_outputFolder)]
    exportPath: Annotated[pathlib.Path, Default(generator=lambda: _outputFolder() / "drr.png")]
    synthesisInput: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]]
    synthesisModel: Annotated[str, Choice(SVDRR_MODEL_NAMES)] = DEFAULT_SVDRR_MODEL
    synthesisModelFolder: pathlib.Path
    synthesisAzimuth: Annotated[float, WithinRange(-180.0, 180.0)] = 30.0
    synthesisElevation: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0
    synthesisViews: str = ""
    synthesisSteps: Annotated[int, WithinRange(1, 1000)] = 20
    synthesisGuidance: Annotated[float, WithinRange(0.0, 50.0)] = 3.0
    synthesisSeed: Annotated[int, WithinRange(0, 2147483647)] = 0
    synthesisOutputDirectory: Annotated[pathlib.Path, Default(generator=_outputFolder)]
    reconstructionMethod: Annotated[str, Choice(RECONSTRUCTION_METHODS)] = "DVG-Diffusion"
    reconstructionInput1: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]]
    reconstructionInput2: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]]
    reconstructionAzimuth1: Annotated[float, WithinRange(-180.0, 180.0)] = 0.0
    reconstructionElevation1: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0
    reconstructionAzimuth2: Annotated[float, WithinRange(-180.0, 180.0)] = 90.0
    reconstructionElevation2: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0
    reconstructionModel: Annotated[str, Choice(RECONSTRUCTION_MODEL_NAMES)] = DEFAULT_RECONSTRUCTION_MODEL
    reconstructionModelFolder: pathlib.Path
    reconstructionSteps: Annotated[int, WithinRange(0, 1000)] = 0
    reconstructionSeed: Annotated[int, WithinRange(0, 2147483647)] = 0
    reconstructionOutputDirectory: Annotated[pathlib.Path, Default(generator=_outputFolder)]


#
# SVDRRSlicerWidget
#


class SVDRRSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the panel to the logic. Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastPreset = None
        self._lastRenderKey = None
        self._inputInfo = (None, None)
        self._synthesisInputInfo = (None, None)   # (node key, kind) of the novel-view input
        self._modelStatus = (None, None)          # ((model, folder, packages installed), ModelStatus or None)
        self._reconstructionInputInfo = {}        # input number -> (node key, ReconstructionInput)
        self._reconstructionModelStatus = (None, None)  # ((method, model, folder, packages), ModelStatus or None)
        self._lastReconstructionMethod = None
        self._previewAngles = None
        self._observedSource = None
        self._dragging = False
        self._job = None
        self._jobInfo = None
        self._previewTimer = None
        self._settleTimer = None
        self._jobTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI", "SVDRRSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # the .ui connects the top widget's mrmlSceneChanged(vtkMRMLScene*) to each node selector's setMRMLScene
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SVDRRSlicerLogic()

        self._previewTimer = self._singleShotTimer(PREVIEW_INTERVAL_MS, self._renderPreview)
        self._settleTimer = self._singleShotTimer(SETTLE_INTERVAL_MS, self._renderFull)
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(JOB_POLL_MS)
        self._jobTimer.connect("timeout()", self._pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.renderButton.connect("clicked(bool)", self.onRenderButton)
        self.ui.renderOrbitButton.connect("clicked(bool)", self.onRenderOrbit)
        self.ui.cancelOrbitButton.connect("clicked(bool)", self.onCancelJob)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.synthesizeButton.connect("clicked(bool)", self.onSynthesize)
        self.ui.cancelSynthesisButton.connect("clicked(bool)", self.onCancelJob)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.cancelReconstructionButton.connect("clicked(bool)", self.onCancelJob)
        # sliders do not track (tracking=false in the .ui): valueIsChanging while dragging -> preview,
        # valueChanged on release -> parameter node -> full-resolution render
        self.ui.azimuthSliderWidget.connect("valueIsChanging(double)", self.onAzimuthChanging)
        self.ui.elevationSliderWidget.connect("valueIsChanging(double)", self.onElevationChanging)
        self.ui.orbitProgressBar.hide()
        self.ui.synthesisProgressBar.hide()
        self.ui.reconstructionProgressBar.hide()

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self._updateDeviceLabel)

    @staticmethod
    def _singleShotTimer(interval, callback):
        timer = qt.QTimer()
        timer.setSingleShot(True)
        timer.setInterval(interval)
        timer.connect("timeout()", callback)
        return timer

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        for timer in (self._previewTimer, self._settleTimer, self._jobTimer):
            if timer is not None:
                timer.stop()
        if self._job is not None and not self._job.done:
            self._job.cancel()
        self.removeObservers()

    def enter(self) -> None:
        # a model may have been downloaded meanwhile (e.g. from the console)
        self._modelStatus = self._reconstructionModelStatus = (None, None)
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._observeSource(None)
        self.logic.resetSession()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ---------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.logic.defaultInputNode()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # each bound widget of the .ui carries a "SlicerParameterName" dynamic property
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._lastPreset = self._parameterNode.geometryPreset  # a reloaded scene keeps its own distances
            self._lastReconstructionMethod = self._parameterNode.reconstructionMethod  # ... and its own model
            self._lastRenderKey = None
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        if p.geometryPreset != self._lastPreset:
            self._lastPreset = p.geometryPreset
            self._applyPreset(p.geometryPreset)  # modifies p again (this handler runs nested, harmlessly)
        if p.reconstructionMethod != self._lastReconstructionMethod:
            self._lastReconstructionMethod = p.reconstructionMethod
            p.reconstructionModel = RECONSTRUCTION_DEFAULT_MODELS[p.reconstructionMethod]  # the method's own model
        self._updateInputInfo()
        self._updateSynthesisInfo()
        self._updateReconstructionInfo()
        self._updateButtons()
        if p.live and self._canRender() and self._renderKey() != self._lastRenderKey and self.logic.dependenciesMet():
            self._settleTimer.start()  # (re)start: renders once the values stop changing

    def _applyPreset(self, name) -> None:
        preset = PRESETS.get(name)
        if not preset:
            return
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            p.sourceAxisDistance = float(preset["sad"])
            p.sourceDetectorDistance = float(preset["sdd"])
            p.detectorColumns, p.detectorRows = (int(n) for n in preset["detector"])
            p.pixelSize = float(preset["pixel"][0])

    # -- state of the panel -------------------------------------------------------------------------------
    def _updateInputInfo(self) -> None:
        node = self._parameterNode.inputVolume
        key = (node.GetID(), node.GetMTime()) if node else None
        if key == self._inputInfo[0]:
            return
        kind, reason = self.logic.classify(node)
        self._inputInfo = (key, kind)
        if kind == "xray":
            reason += " " + _("Choose it in 'Novel views' to synthesize other views of it.")
        self.ui.inputKindLabel.text = reason

    def _inputKind(self):
        return self._inputInfo[1]

    def _updateSynthesisInfo(self) -> None:
        """The two status lines of 'Novel views': what the chosen X-ray is, and whether the model is usable
        (re-checked only when the node, the model choice or the installed packages change)."""
        p = self._parameterNode
        node = p.synthesisInput
        key = (node.GetID(), node.GetMTime()) if node else None
        if key != self._synthesisInputInfo[0]:
            kind, reason = self.logic.classify(node)
            if kind == "ct":
                reason = _("'{name}' is a 3D volume: choose a 2D X-ray, e.g. a DRR rendered above.").format(
                    name=node.GetName())
            elif node is None:
                reason = _("Choose a 2D X-ray (a radiograph, or a DRR rendered above).")
            self._synthesisInputInfo = (key, kind)
            self.ui.synthesisInputLabel.text = reason
        modelKey = (p.synthesisModel, str(p.synthesisModelFolder), self.logic.dependenciesMet())
        if modelKey != self._modelStatus[0]:
            status = self.logic.modelStatus(p.synthesisModel, p.synthesisModelFolder)
            self._modelStatus = (modelKey, status)
            self.ui.synthesisModelStatusLabel.text = status.message if status is not None else _(
                "Checked once SVDRR's Python packages are installed (Synthesize sets them up).")

    def _reconstructionSlots(self):
        """Per X-ray of 'Reconstruct CT': (number, node, entered view, status label, azimuth and elevation boxes)."""
        p = self._parameterNode
        return ((1, p.reconstructionInput1, (p.reconstructionAzimuth1, p.reconstructionElevation1),
                 self.ui.reconstructionInput1Label, self.ui.reconstructionAzimuth1SpinBox,
                 self.ui.reconstructionElevation1SpinBox),
                (2, p.reconstructionInput2, (p.reconstructionAzimuth2, p.reconstructionElevation2),
                 self.ui.reconstructionInput2Label, self.ui.reconstructionAzimuth2SpinBox,
                 self.ui.reconstructionElevation2SpinBox))

    def _updateReconstructionInfo(self) -> None:
        """The status lines of 'Reconstruct CT': each X-ray (with its stored view, whose entry boxes are then
        disabled) and whether the model suits the method; re-checked only when what they depend on changes."""
        p = self._parameterNode
        for number, node, _view, label, azimuthBox, elevationBox in self._reconstructionSlots():
            key = (node.GetID(), node.GetMTime(), self.logic.dependenciesMet()) if node else None
            if number not in self._reconstructionInputInfo or key != self._reconstructionInputInfo[number][0]:
                info = self.logic.reconstructionInput(node, optional=number == 2)
                self._reconstructionInputInfo[number] = (key, info)
                label.text = info.message
                azimuthBox.enabled = elevationBox.enabled = info.needsView
        modelKey = (p.reconstructionMethod, p.reconstructionModel, str(p.reconstructionModelFolder),
                    self.logic.dependenciesMet())
        if modelKey != self._reconstructionModelStatus[0]:
            status = self.logic.reconstructionModelStatus(p.reconstructionMethod, p.reconstructionModel,
                                                          p.reconstructionModelFolder)
            self._reconstructionModelStatus = (modelKey, status)
            self.ui.reconstructionModelStatusLabel.text = status.message if status is not None else _(
                "Checked once SVDRR's Python packages are installed (Reconstruct sets them up).")

    def _reconstructionInputs(self):
        """The chosen X-ray nodes (the second only when set) and, for each, the entered view when it has none."""
        nodes, views = [], []
        for number, node, view, *_widgets in self._reconstructionSlots():
            if node is not None:
                nodes.append(node)
                views.append(view if self._reconstructionInputInfo[number][1].needsView else None)
        return nodes, views

    def _canReconstruct(self) -> bool:
        p = self._parameterNode
        if p is None or p.reconstructionInput1 is None:
            return False
        if not self.logic.dependenciesMet():
            return True  # the click installs the packages, then checks the X-rays and the model
        status = self._reconstructionModelStatus[1]
        inputsReady = all(info.usable for _key, info in self._reconstructionInputInfo.values())
        return inputsReady and status is not None and status.available

    def _canSynthesize(self) -> bool:
        p = self._parameterNode
        if p is None or p.synthesisInput is None:
            return False
        if not self.logic.dependenciesMet():
            return True  # the click installs the packages, then checks the X-ray and the model
        status = self._modelStatus[1]
        return self._synthesisInputInfo[1] == "xray" and status is not None and status.available

    def _canRender(self) -> bool:
        return self._parameterNode is not None and self._inputKind() == "ct"

    def _canStartRender(self) -> bool:
        """The render buttons also work before the packages exist: the click installs them, then checks the input."""
        return self._parameterNode is not None and self._inputKind() in ("ct", "unknown")

    def _installAndCheckInput(self) -> bool:
        """Install the packages if needed (after asking), then re-detect the input; say why it cannot be rendered."""
        if not self.logic.ensureDependencies():
            return False
        self._inputInfo = (None, None)
        self._updateInputInfo()
        self._updateDeviceLabel()
        if self._inputKind() != "ct":
            raise ValueError(self.ui.inputKindLabel.text)
        return True

    def _jobRunning(self) -> bool:
        return self._job is not None and not self._job.done

    def _updateButtons(self) -> None:
        canStart = self._canStartRender()
        running = self._jobRunning()
        runningKind = self._jobInfo["kind"] if running and self._jobInfo else None
        self.ui.renderButton.enabled = canStart
        self.ui.renderOrbitButton.enabled = canStart and not running
        self.ui.cancelOrbitButton.enabled = runningKind == "orbit"
        self.ui.synthesizeButton.enabled = self._canSynthesize() and not running
        self.ui.cancelSynthesisButton.enabled = runningKind == "synthesis"
        self.ui.reconstructButton.enabled = self._canReconstruct() and not running
        self.ui.cancelReconstructionButton.enabled = runningKind == "reconstruction"
        output = self._parameterNode.drrVolume
        self.ui.exportButton.enabled = bool(output and output.GetImageData())
        tip = "" if canStart else _("Select a CT volume first.")
        self.ui.renderButton.toolTip = tip or _("Render the DRR of the current view at full resolution.")

    def _updateDeviceLabel(self) -> None:
        if not self.logic.dependenciesMet():
            self.ui.deviceLabel.text = _("PyTorch is not installed yet: it is set up on first use.")
            return
        from SVDRRLogic.session import device_summary

        self.ui.deviceLabel.text = _("auto uses: {device}").format(device=device_summary("auto"))

    def _renderKey(self):
        p = self._parameterNode
        node = p.inputVolume
        return (node.GetID() if node else None, p.geometryPreset, p.sourceAxisDistance, p.sourceDetectorDistance,
                p.detectorColumns, p.detectorRows, p.pixelSize, p.azimuth, p.elevation, p.device, p.huModel)

    def _viewSettings(self, azimuth=None, elevation=None) -> dict:
        p = self._parameterNode
        return dict(sad=p.sourceAxisDistance, sdd=p.sourceDetectorDistance,
                    detector=(p.detectorColumns, p.detectorRows), pixel=p.pixelSize,
                    azimuth=p.azimuth if azimuth is None else azimuth,
                    elevation=p.elevation if elevation is None else elevation)

    # -- rendering --------------------------------------------------------------------------------------------
    def onAzimuthChanging(self, value) -> None:
        self._schedulePreview(value, self._parameterNode.elevation if self._parameterNode else 0.0)

    def onElevationChanging(self, value) -> None:
        self._schedulePreview(self._parameterNode.azimuth if self._parameterNode else 0.0, value)

    def _schedulePreview(self, azimuth, elevation) -> None:
        if not (self._canRender() and self._parameterNode.live and self.logic.dependenciesMet()):
            return
        self._previewAngles = (azimuth, elevation)
        if not self._previewTimer.isActive():  # throttle: keep rendering during a long drag
            self._previewTimer.start()

    def _renderPreview(self) -> None:
        if self._previewAngles is not None:
            self._render(preview=True, angles=self._previewAngles)

    def _renderFull(self) -> None:
        self._render(preview=False)

    def onRenderButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to render the DRR."), waitCursor=True):
            if not self._installAndCheckInput():
                return
            self._render(preview=False, raiseErrors=True)

    def _render(self, preview, angles=None, raiseErrors=False) -> None:
        """Render the current view (or ``angles``) into the output volume. Errors of automatic renders (a value
        being typed, SDD below SAD for a moment) go to the status line, not into dialogs."""
        if not self._canRender():
            return
        p = self._parameterNode
        settings = self._viewSettings(*(angles or (None, None)))
        try:
            started = time.perf_counter()
            session = self.logic.session(p.inputVolume, p.device, p.huModel)
            geometry = session.geometry_for(p.geometryPreset, **settings)
            node = self.logic.renderDRR(geometry, p.drrVolume, preview=preview, previewScale=p.previewScale)
        except Exception as exc:
            self.ui.drrStatusLabel.text = _("Not rendered: {error}").format(error=exc)
            if raiseErrors:
                raise
            logging.debug(f"SVDRR render failed: {exc}")
            return
        elapsed = time.perf_counter() - started
        if not preview:  # before the output is set, whose parameter change would otherwise render it again
            self._lastRenderKey = self._renderKey()
        if p.drrVolume is not node:
            p.drrVolume = node
        self._observeSource(session.carm.source_node)
        self.logic.showInSliceView(node, fit=not preview)
        shown = session.geometry
        self.ui.drrStatusLabel.text = _("{kind} {w} x {h} px, azimuth {az:.1f}°, elevation {el:.1f}°, {ms:.0f} ms").format(
            kind=_("Preview") if preview else _("DRR"), w=shown.detector[0], h=shown.detector[1], az=shown.azimuth,
            el=shown.elevation, ms=1000.0 * elapsed)
        self._updateButtons()

    # -- the source point in the 3D view ------------------------------------------------------------------------
    def _observeSource(self, sourceNode) -> None:
        if sourceNode is self._observedSource:
            return
        if self._observedSource is not None:
            for event, callback in self._sourceEvents():
                self.removeObserver(self._observedSource, event, callback)
        self._observedSource = sourceNode
        if sourceNode is not None:
            for event, callback in self._sourceEvents():
                self.addObserver(sourceNode, event, callback)

    def _sourceEvents(self):
        return ((slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self.onSourceMoved),
                (slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent, self.onSourceDragStarted),
                (slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onSourceReleased))

    def onSourceDragStarted(self, caller, event) -> None:
        self._dragging = True

    def onSourceMoved(self, caller, event) -> None:
        carm = self.logic.carm()
        if carm is None or carm.is_updating or self._parameterNode is None:
            return
        try:
            azimuth, elevation = carm.angles_from_source()
        except ValueError:  # the point sits on the isocenter
            return
        if self._dragging:
            self._schedulePreview(azimuth, elevation)
        else:  # moved without a drag (typed coordinates): take it as final
            self._setAngles(azimuth, elevation)

    def onSourceReleased(self, caller, event) -> None:
        self._dragging = False
        carm = self.logic.carm()
        if carm is None or self._parameterNode is None:
            return
        try:
            azimuth, elevation = carm.angles_from_source()
        except ValueError:
            return
        self._setAngles(azimuth, elevation)
        if not self._parameterNode.live:
            # no re-render: still turn the C-arm drawing to where the source now is
            self.logic.turnCArm(azimuth, elevation)

    def _setAngles(self, azimuth, elevation) -> None:
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            p.azimuth = max(-180.0, min(180.0, float(azimuth)))
            p.elevation = max(-90.0, min(90.0, float(elevation)))

    # -- sample, orbit and export ------------------------------------------------------------------------------
    def onLoadSample(self) -> None:
        node = loadChestPhantomSample()
        if node is not None:
            self._parameterNode.inputVolume = node
            self._updateDeviceLabel()

    def onRenderOrbit(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the orbit."), waitCursor=True):
            if self._jobRunning() or not self._installAndCheckInput():
                return
            p = self._parameterNode
            session = self.logic.session(p.inputVolume, p.device, p.huModel)
            geometry = session.geometry_for(p.geometryPreset, **self._viewSettings())
            job, info = self.logic.startOrbit(geometry, p.orbitViews, p.orbitOutputDirectory, p.orbitFormat)
            self._startJob(job, info, _("Rendering into {folder}").format(folder=info["outputDir"]))

    def onSynthesize(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the synthesis."), waitCursor=True):
            if self._jobRunning() or not self.logic.ensureDependencies():
                return
            self._synthesisInputInfo = self._modelStatus = (None, None)  # check again, with the packages installed
            self._updateSynthesisInfo()
            p = self._parameterNode
            if self._synthesisInputInfo[1] != "xray":
                raise ValueError(self.ui.synthesisInputLabel.text)
            status = self._modelStatus[1]
            if status is None or not status.available:
                raise ValueError(self.ui.synthesisModelStatusLabel.text)
            views = self.logic.synthesisViews(p.synthesisAzimuth, p.synthesisElevation, p.synthesisViews)
            job, info = self.logic.startSynthesis(p.synthesisInput, status.model, views, p.synthesisOutputDirectory,
                                                  steps=p.synthesisSteps, guidance=p.synthesisGuidance,
                                                  seed=p.synthesisSeed, device=p.device)
            self._startJob(job, info, _("Synthesizing into {folder}").format(folder=info["outputDir"]))

    def onReconstruct(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the reconstruction."), waitCursor=True):
            if self._jobRunning() or not self.logic.ensureDependencies():
                return
            self._reconstructionInputInfo = {}  # check again, with the packages installed
            self._reconstructionModelStatus = (None, None)
            self._updateReconstructionInfo()
            p = self._parameterNode
            for _key, info in self._reconstructionInputInfo.values():
                if not info.usable:
                    raise ValueError(info.message)
            status = self._reconstructionModelStatus[1]
            if status is None or not status.available:
                raise ValueError(self.ui.reconstructionModelStatusLabel.text)
            nodes, views = self._reconstructionInputs()
            reference = p.inputVolume if self._inputKind() == "ct" else None
            job, info = self.logic.startReconstruction(
                nodes, views, status.model, p.reconstructionMethod, p.reconstructionOutputDirectory,
                steps=p.reconstructionSteps or None, seed=p.reconstructionSeed, device=p.device,
                referenceCtNode=reference)
            self._startJob(job, info, _("Reconstructing into {folder}").format(folder=info["outputDir"]))

    # -- worker jobs (orbits, syntheses and reconstructions share this: one job at a time) -------------------------
    def _jobWidgets(self, kind):
        """(progress bar, status label) of the section that started a job of ``kind``."""
        if kind == "synthesis":
            return self.ui.synthesisProgressBar, self.ui.synthesisStatusLabel
        if kind == "reconstruction":
            return self.ui.reconstructionProgressBar, self.ui.reconstructionStatusLabel
        return self.ui.orbitProgressBar, self.ui.orbitStatusLabel

    def _startJob(self, job, info, message) -> None:
        self._job, self._jobInfo = job, info
        bar, label = self._jobWidgets(info["kind"])
        bar.value = 0
        bar.setFormat(_("starting") + " (%p%)")
        bar.show()
        label.text = message
        self._jobTimer.start()
        self._updateButtons()

    def onCancelJob(self) -> None:
        if self._jobRunning():
            self._jobWidgets(self._jobInfo["kind"])[1].text = _("Cancelling...")
            self._job.cancel()
            self._pollJob()

    def _pollJob(self) -> None:
        job = self._job
        if job is None or self._jobInfo is None:
            self._jobTimer.stop()
            return
        bar = self._jobWidgets(self._jobInfo["kind"])[0]
        for event in job.poll():
            if event["type"] == "progress":
                bar.value = int(round(1000 * event["fraction"]))
                bar.setFormat(event["message"].replace("%", "%%") + " (%p%)")
            elif event["type"] == "log":
                logging.info(f"SVDRR worker: {event['message']}")
        if job.done:
            self._jobTimer.stop()
            self._onJobDone(job)

    def _onJobDone(self, job) -> None:
        info, self._jobInfo = self._jobInfo, None
        bar, label = self._jobWidgets(info["kind"])
        bar.hide()
        titles = {"orbit": _("Orbit"), "synthesis": _("Novel views"), "reconstruction": _("Reconstruction")}
        title = titles[info["kind"]]
        try:
            if job.state == "finished":
                with slicer.util.tryWithErrorDisplay(_("Failed to import the results."), waitCursor=True):
                    label.text = self._importJobResult(job.result, info)
            elif job.state == "cancelled":
                label.text = _("{what}: cancelled.").format(what=title)
            else:
                label.text = _("{what}: failed.").format(what=title)
                slicer.util.errorDisplay(_("{what} failed: {error}").format(what=title, error=job.error),
                                         windowTitle=_("SVDRR"), detailedText="\n".join(job.stderr_tail))
        finally:
            self.logic.cleanupJob(info)
            self._updateButtons()

    def _importJobResult(self, result, info) -> str:
        """Bring a finished job's files into the scene; returns the status line."""
        if info["kind"] == "reconstruction":
            node = self.logic.importReconstruction(result, info["name"], info["referenceId"])
            slicer.util.resetSliceViews()
            demo = _(" (small demonstration model: the CT only shows the workflow)") if result["demo_model"] else ""
            return _("CT reconstructed with {model}{demo} imported as '{name}'; files in {folder}").format(
                model=result["model"], demo=demo, name=node.GetName(), folder=info["outputDir"])
        if info["kind"] == "synthesis":
            imported = self.logic.importSynthesis(result, info["name"])
            if imported.sequence is not None:
                return _("{n} synthesized views imported as the sequence '{name}' (browse them with the Sequences "
                         "module); files in {folder}").format(n=imported.count, name=imported.sequence.GetName(),
                                                              folder=info["outputDir"])
            node = imported.nodes[0]
            self.logic.showInSliceView(node)
            return _("Synthesized view imported as '{name}'; files in {folder}").format(name=node.GetName(),
                                                                                       folder=info["outputDir"])
        sequence = self.logic.importOrbit(result, info["name"])[0]
        return _("{n} views imported as the sequence '{name}' (browse them with the Sequences module); files in "
                 "{folder}").format(n=sequence.GetNumberOfDataNodes(), name=sequence.GetName(),
                                    folder=info["outputDir"])

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to export the DRR."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            path = self.logic.exportDRR(self._parameterNode.drrVolume, self._parameterNode.exportPath)
            slicer.util.showStatusMessage(_("DRR written to {path}").format(path=path), 5000)


#
# SVDRRSlicerLogic
#


class SVDRRSlicerLogic(ScriptedLoadableModuleLogic):
    """Thin adapter from Slicer to the engine: ``SVDRRLogic`` with ``slicer.mrmlScene``, Slicer's module logics
    and Slicer's Python environment. Usable without the widget (scripts, tests). Uses ScriptedLoadableModuleLogic
    base class, available at: https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self._dependenciesMet = None

    def getParameterNode(self):
        return SVDRRSlicerParameterNode(super().getParameterNode())

    # -- Python dependencies (installed on first use, after asking) ---------------------------------------------
    @staticmethod
    def _dependencyPlan():
        from SVDRRSlicerLib import dependencies

        requirements = dependencies.read_requirements(resourcePath("requirements-slicer.txt"))
        toInstall, warnings = dependencies.plan(requirements)
        return dependencies, toInstall, warnings, not dependencies.torch_is_met()

    def dependenciesMet(self) -> bool:
        """Whether torch and the engine's packages are installed (package metadata only: nothing is imported)."""
        if not self._dependenciesMet:
            _deps, toInstall, _warnings, needTorch = self._dependencyPlan()
            self._dependenciesMet = not toInstall and not needTorch
        return self._dependenciesMet

    def ensureDependencies(self, askConfirmation=True) -> bool:
        """Install what is missing: torch through the PyTorch extension, the rest with pip from
        Resources/requirements-slicer.txt. Asks first (not in testing mode); returns False if the user declines."""
        if self.dependenciesMet():
            return True
        deps, toInstall, warnings, needTorch = self._dependencyPlan()
        for warning in warnings:
            logging.warning(warning)
        if needTorch and not hasattr(slicer.modules, "pytorchutils"):
            slicer.util.errorDisplay(_("SVDRR needs the PyTorch extension. Install 'PyTorch' with the Extensions "
                                       "Manager, restart Slicer, and try again."), windowTitle=_("SVDRR"))
            return False
        items = ([f"torch{deps.TORCH_REQUIREMENT} " + _("(through the PyTorch extension: a GPU build when a "
                                                        "compatible NVIDIA driver is found)")] if needTorch else [])
        items += toInstall
        if askConfirmation and not slicer.app.commandOptions().testingEnabled:
            question = _("SVDRR needs these Python packages. Download and install them into Slicer now? "
                         "This can take several minutes.")
            if not slicer.util.confirmOkCancelDisplay(question + "\n\n" + "\n".join(items),
                                                      windowTitle=_("SVDRR: install Python packages")):
                return False
        with slicer.util.WaitCursor():
            if needTorch:
                import PyTorchUtils

                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=deps.TORCH_REQUIREMENT)
                if torch is None:
                    raise RuntimeError(_("PyTorch could not be installed; see the PyTorch Utils module."))
            if toInstall:
                slicer.util.pip_install(toInstall)
        import importlib

        importlib.invalidate_caches()
        self._dependenciesMet = None
        if not self.dependenciesMet():
            _deps, stillMissing, _warnings, torchMissing = self._dependencyPlan()
            raise RuntimeError(_("Still missing after installation: {packages}. Restart Slicer and try again.").format(
                packages=", ".join(stillMissing + (["torch"] if torchMissing else []))))
        return True

    # -- inputs -------------------------------------------------------------------------------------------------
    def classify(self, node):
        """('ct' | 'xray' | 'unsupported' | 'unknown', reason) for the input label."""
        if node is None:
            return "unsupported", _("no volume selected")
        if not self.dependenciesMet():
            return "unknown", _("'{name}': CT or X-ray is detected once SVDRR's Python packages are installed "
                                "(Load sample or Render DRR sets them up).").format(name=node.GetName())
        from SVDRRLogic.mrml import classify_volume_node

        kind, reason = classify_volume_node(node)
        label = {"ct": _("CT"), "xray": _("X-ray"), "unsupported": _("Not usable")}[kind]
        return kind, f"{label}: {reason}"

    def defaultInputNode(self):
        """The volume the panel starts on (``session.default_input_node``); before SVDRR's packages are installed,
        hence before it can have made any image, the first volume."""
        if not self.dependenciesMet():
            return slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        from SVDRRLogic.session import default_input_node

        return default_input_node(slicer.mrmlScene)

    def loadChestPhantom(self, name=SAMPLE_NAME, **phantom):
        """SVDRR's sample: a procedural chest CT (synthetic, no patient data) as a new volume node."""
        from SVDRRLogic.session import add_chest_phantom

        volumeRendering = getattr(slicer.modules, "volumerendering", None)
        return add_chest_phantom(slicer.mrmlScene, name=name,
                                 volume_rendering_logic=volumeRendering.logic() if volumeRendering else None,
                                 **phantom)

    # -- live DRR -------------------------------------------------------------------------------------------------
    def session(self, ctNode, device="auto", huModel="physical"):
        """The live session for this CT node, device and HU model (a new one when any of them changed)."""
        from SVDRRLogic.session import DRRSession

        if ctNode is None:
            raise ValueError(_("Select a CT volume first."))
        if self._session is None or not self._session.is_for(ctNode, device, huModel):
            self._session = DRRSession(slicer.mrmlScene, ctNode, device=device, hu_model=huModel)
        return self._session

    def resetSession(self) -> None:
        self._session = None

    def carm(self):
        """The C-arm display of the current session, or None."""
        return self._session.carm if self._session is not None else None

    def renderDRR(self, geometry, outputNode=None, preview=False, previewScale=4):
        """Render ``geometry`` with the current session into ``outputNode`` (None: a new node); returns the node."""
        if self._session is None:
            raise RuntimeError(_("No CT session: call session(ctNode) first."))
        return self._session.render(geometry, output_node=outputNode, preview=preview, preview_scale=previewScale)

    def turnCArm(self, azimuth, elevation) -> None:
        """Move the C-arm drawing to new angles without rendering (live off)."""
        if self._session is not None and self._session.geometry is not None:
            self._session.carm.update(self._session.geometry.with_view(azimuth, elevation))

    @staticmethod
    def showInSliceView(volumeNode, viewName="Red", fit=True) -> None:
        """Show the DRR in a slice view turned to the detector plane (no-op without a layout, e.g. in batch)."""
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget(viewName) if layoutManager else None
        if sliceWidget is None or volumeNode is None:
            return
        composite = sliceWidget.mrmlSliceCompositeNode()
        if composite.GetBackgroundVolumeID() != volumeNode.GetID():
            composite.SetBackgroundVolumeID(volumeNode.GetID())
            fit = True
        sliceWidget.mrmlSliceNode().RotateToVolumePlane(volumeNode)
        if fit:
            sliceWidget.sliceLogic().FitSliceToAll()

    def exportDRR(self, volumeNode, path):
        """Write a DRR node to ``path`` (PNG, DICOM, NRRD, ... by extension), with its C-arm geometry."""
        from SVDRRLogic.session import export_drr

        if volumeNode is None:
            raise ValueError(_("There is no DRR to export yet."))
        path = pathlib.Path(path)
        if not path.name or path.is_dir():
            raise ValueError(_("Choose a file name (.png, .dcm, .nrrd, .nii.gz or .mha)."))
        path.parent.mkdir(parents=True, exist_ok=True)
        return export_drr(volumeNode, path)

    # -- orbits (separate process) --------------------------------------------------------------------------------
    @staticmethod
    def pythonSlicerExecutable():
        """The interpreter for workers: PythonSlicer (Slicer's Python with its environment)."""
        executable = shutil.which("PythonSlicer")
        if not executable:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer; cannot start a worker process."))
        return executable

    def _startWorker(self, spec, workDir, outputDir, name, kind):
        """Write ``spec`` as the job file in ``workDir`` and start the worker on it; returns ``(job, info)``."""
        from SVDRRLogic.jobs import start_job, write_job_file

        jobFile = write_job_file(spec, pathlib.Path(workDir) / "job.json")
        job = start_job([self.pythonSlicerExecutable(), WORKER_SCRIPT, str(jobFile)],
                        env=slicer.util.startupEnvironment())
        return job, {"workDir": str(workDir), "outputDir": str(outputDir), "name": name, "kind": kind}

    def startOrbit(self, geometry, views, outputFolder, fileFormat="nrrd", batch=4):
        """Start rendering ``views`` (a view-set string or [[az, el], ...]) of the current session's CT around
        ``geometry`` in a worker process. Returns ``(job, info)``: poll ``job`` from a timer (``SVDRRLogic.jobs``),
        then pass ``job.result`` to :meth:`importOrbit` and ``info`` to :meth:`cleanupJob`."""
        from SVDRRLogic.session import orbit_job

        if self._session is None:
            raise RuntimeError(_("No CT session: call session(ctNode) first."))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        outputDir = pathlib.Path(outputFolder) / f"orbit-{stamp}"
        workDir = pathlib.Path(slicer.util.tempDirectory("SVDRR-job"))
        try:
            # check the view set before writing the CT (a typo fails at once)
            orbit_job(workDir / "ct.nrrd", geometry, views, outputDir, fileFormat)
            ctPath = self._session.write_ct(workDir / "ct.nrrd")
            spec = orbit_job(ctPath, geometry, views, outputDir, fileFormat, device=self._session.device,
                             hu_model=self._session.hu_model, batch=batch)
            name = f"{self._session.ct_node.GetName()} orbit {stamp}"
            return self._startWorker(spec, workDir, outputDir, name, "orbit")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    # -- novel views (SV-DRR, separate process) -------------------------------------------------------------------
    def modelStatus(self, name, folder=None):
        """Whether the SV-DRR model ``name`` (or the model ``folder``, which wins when set) can be used without a
        download: a ``SVDRRLogic.session_synthesis.ModelStatus``, or None before the Python packages exist."""
        if not self.dependenciesMet():
            return None
        from SVDRRLogic.session_synthesis import model_status

        return model_status(name, folder)

    @staticmethod
    def synthesisViews(azimuth, elevation, spec=""):
        """The target views: ``spec`` (arc:..., hemisphere:N, "AZ,EL; AZ,EL") or else the one view given."""
        from SVDRRLogic.session_synthesis import target_views

        return target_views(azimuth, elevation, spec)

    def startSynthesis(self, xrayNode, model, views, outputFolder, steps=20, guidance=3.0, seed=0, device="auto",
                       fileFormat="nrrd", batch=4):
        """Start synthesizing ``views`` of the X-ray in ``xrayNode`` with the SV-DRR ``model`` (catalogue name or
        folder) in a worker process. Returns ``(job, info)`` like :meth:`startOrbit`; pass ``job.result`` to
        :meth:`importSynthesis`."""
        from SVDRRLogic.session_synthesis import synthesis_job, write_xray_input

        if xrayNode is None:
            raise ValueError(_("Select an X-ray first."))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        outputDir = pathlib.Path(outputFolder) / f"synthesis-{stamp}"
        workDir = pathlib.Path(slicer.util.tempDirectory("SVDRR-job"))
        settings = dict(steps=steps, guidance=guidance, seed=seed, device=device, fmt=fileFormat, batch=batch,
                        input_label=xrayNode.GetName())
        try:
            synthesis_job(workDir / "xray.nrrd", model, views, outputDir, **settings)  # fails at once on a typo
            xrayPath = write_xray_input(xrayNode, workDir / "xray.nrrd")
            spec = synthesis_job(xrayPath, model, views, outputDir, **settings)
            return self._startWorker(spec, workDir, outputDir, f"{xrayNode.GetName()} novel views", "synthesis")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    @staticmethod
    def importSynthesis(result, name="Synthesized X-ray"):
        """Import a finished synthesis (the job's result event): one node per view on its detector plane, or a
        sequence for several views; returns a ``SVDRRLogic.session_synthesis.SynthesisImport``."""
        from SVDRRLogic.session_synthesis import import_synthesis

        sequences = getattr(slicer.modules, "sequences", None)
        return import_synthesis(slicer.mrmlScene, result["synthesis_json"], name=name,
                                sequences_logic=sequences.logic() if sequences else None)

    # -- CT reconstruction (DVG-Diffusion or 3D patch EDM, separate process) -------------------------------------
    def reconstructionInput(self, node, optional=False):
        """A ``ReconstructionInput`` for ``node`` as an X-ray of the reconstruction (``optional``: the second one,
        which may be left empty): a 2D X-ray, with the view SVDRR stored on it when it rendered or synthesized it."""
        if node is None:
            return ReconstructionInput(optional, False, _("None: the CT is reconstructed from the first X-ray alone.")
                                       if optional else _("Choose a 2D X-ray (a radiograph, or a DRR rendered above)."))
        kind, reason = self.classify(node)
        if kind == "unknown":
            return ReconstructionInput(False, True, reason)
        if kind != "xray":
            if kind == "ct":
                reason = _("'{name}' is a 3D volume: choose a 2D X-ray, e.g. a DRR rendered above.").format(
                    name=node.GetName())
            return ReconstructionInput(False, False, reason)
        from SVDRRLogic.session_reconstruction import xray_view_of

        view = xray_view_of(node)
        if view is None:
            return ReconstructionInput(True, True, reason + " " + _("No stored view: enter its azimuth and elevation."))
        stored = _("Stored view: azimuth {az:g}°, elevation {el:g}°.").format(az=view[0], el=view[1])
        return ReconstructionInput(True, False, f"{reason} {stored}")

    def reconstructionModelStatus(self, method, name, folder=None):
        """Whether ``method`` ("DVG-Diffusion", "3D patch EDM") can run with the catalogue model ``name`` (or the
        model ``folder``, which wins when set) without a download: a ``ModelStatus``, or None before the Python
        packages exist."""
        if not self.dependenciesMet():
            return None
        from SVDRRLogic.session_reconstruction import reconstruction_model_status

        return reconstruction_model_status(method, name, folder)

    def startReconstruction(self, xrayNodes, views, model, method, outputFolder, steps=None, seed=0, device="auto",
                            referenceCtNode=None):
        """Start reconstructing a CT from one or two X-ray nodes in a worker process. ``views``: per node, the
        (azimuth, elevation) entered for it, or None to use the view stored on it; ``model``: catalogue name or
        folder; ``method``: "DVG-Diffusion" or "3D patch EDM"; ``steps`` None: the model's own number. A film
        without stored geometry is centred on ``referenceCtNode`` when given. Returns ``(job, info)`` like
        :meth:`startOrbit`; pass ``job.result`` and ``info["referenceId"]`` to :meth:`importReconstruction`."""
        from SVDRRLogic.session_reconstruction import default_center, reconstruction_job, write_reconstruction_inputs

        if not xrayNodes:
            raise ValueError(_("Select an X-ray first."))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        outputDir = pathlib.Path(outputFolder) / f"reconstruction-{stamp}"
        workDir = pathlib.Path(slicer.util.tempDirectory("SVDRR-job"))
        try:
            inputs = write_reconstruction_inputs(xrayNodes, workDir, views)  # the views are checked first, per node
            spec = reconstruction_job(inputs, outputDir / "ct.nii.gz", model, method, steps=steps,
                                      seed=seed, device=device, keep=outputDir,
                                      center_ras=default_center(xrayNodes, referenceCtNode))
            name = _("{method} CT from {inputs}").format(method=method,
                                                          inputs=" + ".join(n.GetName() for n in xrayNodes))
            job, info = self._startWorker(spec, workDir, outputDir, name, "reconstruction")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        info["referenceId"] = referenceCtNode.GetID() if referenceCtNode is not None else None
        return job, info

    @staticmethod
    def importReconstruction(result, name="Reconstructed CT", referenceId=None):
        """Import a finished reconstruction (the job's result event) as a new synthetic CT node with volume
        rendering, over the reference CT (node ID ``referenceId``, when it still exists) in the slice views."""
        from SVDRRLogic.session_reconstruction import import_reconstruction

        reference = slicer.mrmlScene.GetNodeByID(referenceId) if referenceId else None
        volumeRendering = getattr(slicer.modules, "volumerendering", None)
        return import_reconstruction(slicer.mrmlScene, result["ct"], name, reference, manifest=result["manifest"],
                                     volume_rendering_logic=volumeRendering.logic() if volumeRendering else None)

    @staticmethod
    def importOrbit(result, name="DRR orbit"):
        """Import a finished orbit (the job's result event) as a sequence + browser; returns both."""
        from SVDRRLogic.session import add_orbit

        sequences = getattr(slicer.modules, "sequences", None)
        sequence, browser = add_orbit(slicer.mrmlScene, result["views_json"], name=name,
                                      sequences_logic=sequences.logic() if sequences else None)
        return sequence, browser

    @staticmethod
    def cleanupJob(info) -> None:
        """Delete a job's temporary folder (the CT copy and the job file)."""
        if info and info.get("workDir"):
            shutil.rmtree(info["workDir"], ignore_errors=True)


#
# SVDRRSlicerTest
#


class SVDRRSlicerTest(ScriptedLoadableModuleTest):
    """The full flow in a real Slicer: sample, DRR, source drag, preview, orbit job, cancel, export, novel views,
    CT reconstruction.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SVDRRSlicer_flow()
        self.setUp()
        self.test_SVDRRSlicer_widget()
        self.setUp()
        self.test_SVDRRSlicer_synthesis()
        self.setUp()
        self.test_SVDRRSlicer_reconstruction()

    def _smallView(self, logic, ctNode, azimuth=0.0, elevation=0.0):
        session = logic.session(ctNode, "auto", "physical")
        settings = dict(sad=1650.0, sdd=1800.0, detector=(64, 48), pixel=6.0, azimuth=azimuth, elevation=elevation)
        return session, session.geometry_for("svdrr-lidc", **settings)

    def test_SVDRRSlicer_flow(self):
        import numpy as np

        self.delayDisplay("Starting the SVDRR flow test")
        logic = SVDRRSlicerLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))

        registerSampleData()
        import SampleData

        names = [s.sampleName for s in SampleData.SampleDataLogic.sampleDataSourcesByCategory(SAMPLE_CATEGORY)]
        self.assertIn(SAMPLE_NAME, names)
        ctNode = logic.loadChestPhantom(shape=(48, 96, 96), spacing=(3.7, 3.7, 6.7))
        self.assertEqual(logic.classify(ctNode)[0], "ct")
        self.delayDisplay("Loaded the chest phantom")

        from SVDRRLogic.io import load_xray
        from SVDRRLogic.mrml import geometry_from_node

        session, geometry = self._smallView(logic, ctNode)
        drrNode = logic.renderDRR(geometry)
        self.assertEqual(slicer.util.arrayFromVolume(drrNode).shape, (1, 48, 64))
        self.assertGreater(float(slicer.util.arrayFromVolume(drrNode).max()), 1.0)
        self.assertEqual(geometry_from_node(drrNode), geometry)
        logic.showInSliceView(drrNode)
        self.delayDisplay("Rendered a DRR")

        # drag the source point: the angles follow; preview then full resolution into the same node
        moved = geometry.with_view(35.0, 12.0)
        session.carm.source_node.SetNthControlPointPositionWorld(0, *moved.source)
        azimuth, elevation = session.carm.angles_from_source()
        self.assertAlmostEqual(azimuth, 35.0, places=4)
        self.assertAlmostEqual(elevation, 12.0, places=4)
        self.assertIs(logic.renderDRR(geometry.with_view(azimuth, elevation), drrNode, preview=True, previewScale=4),
                      drrNode)
        self.assertEqual(slicer.util.arrayFromVolume(drrNode).shape, (1, 12, 16))
        logic.renderDRR(geometry.with_view(azimuth, elevation), drrNode)
        self.assertEqual(slicer.util.arrayFromVolume(drrNode).shape, (1, 48, 64))
        np.testing.assert_allclose(session.carm.source_position(), moved.source, atol=1e-6)
        self.delayDisplay("Moved the source")

        # an orbit in a worker process, imported as a sequence
        outputFolder = pathlib.Path(slicer.util.tempDirectory("SVDRR-test"))
        job, info = logic.startOrbit(geometry, "arc:-20:20:20", outputFolder, "nrrd")
        job.wait(timeout=600)
        logic.cleanupJob(info)
        self.assertEqual(job.state, "finished", job.error)
        sequence, browser = logic.importOrbit(job.result, "Test orbit")
        self.assertEqual(sequence.GetNumberOfDataNodes(), 3)
        self.assertEqual(geometry_from_node(sequence.GetNthDataNode(2)).azimuth, 20.0)
        self.assertIs(browser.GetMasterSequenceNode(), sequence)
        self.delayDisplay("Rendered an orbit")

        # cancel a long orbit: the worker tree ends
        job, info = logic.startOrbit(geometry, "arc:-180:180:0.1", outputFolder, "nrrd", batch=1)
        deadline = time.monotonic() + 300
        while job.fraction == 0.0 and not job.done and time.monotonic() < deadline:
            job.poll()
            time.sleep(0.05)
        job.cancel()
        logic.cleanupJob(info)
        self.assertEqual(job.state, "cancelled")

        # export
        path = logic.exportDRR(drrNode, outputFolder / "drr.png")
        self.assertEqual(load_xray(path).array.shape, (48, 64))
        self.delayDisplay("Test passed")

    def test_SVDRRSlicer_widget(self):
        self.delayDisplay("Starting the SVDRR widget test")
        slicer.util.selectModule("SVDRRSlicer")
        widget = slicer.util.getModuleWidget("SVDRRSlicer")
        logic = widget.logic
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        ctNode = logic.loadChestPhantom(shape=(48, 96, 96), spacing=(3.7, 3.7, 6.7))
        p = widget._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            p.inputVolume = ctNode
            p.detectorColumns, p.detectorRows, p.pixelSize = 64, 48, 6.0
            p.device = "auto"
        self.assertTrue(widget.ui.renderButton.enabled)
        widget.ui.renderButton.click()
        drrNode = p.drrVolume
        self.assertIsNotNone(drrNode)
        self.assertEqual(slicer.util.arrayFromVolume(drrNode).shape, (1, 48, 64))
        # the preset fills in its values
        p.geometryPreset = "x2ct"
        self.assertEqual((p.sourceAxisDistance, p.detectorColumns), (541.0, 320))
        # a source drag ends with new angles in the parameter node
        carm = logic.carm()
        moved = logic.session(ctNode, p.device, p.huModel).geometry.with_view(-25.0, 5.0)
        carm.source_node.SetNthControlPointPositionWorld(0, *moved.source)
        self.assertAlmostEqual(p.azimuth, -25.0, places=3)
        self.assertAlmostEqual(p.elevation, 5.0, places=3)
        self.delayDisplay("Widget test passed")

    def test_SVDRRSlicer_synthesis(self):
        """Novel views of a DRR with a tiny random SV-DRR model (the images are noise; the plumbing is real)."""
        self.delayDisplay("Starting the SVDRR novel-view test")
        logic = SVDRRSlicerLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        from SVDRRLogic.models import create_random
        from SVDRRLogic.mrml import geometry_from_node

        ctNode = logic.loadChestPhantom(shape=(48, 96, 96), spacing=(3.7, 3.7, 6.7))
        _session, geometry = self._smallView(logic, ctNode)
        drrNode = logic.renderDRR(geometry)
        self.assertEqual(logic.classify(drrNode)[0], "xray")
        tempFolder = pathlib.Path(slicer.util.tempDirectory("SVDRR-test"))
        self.assertFalse(logic.modelStatus("", tempFolder).available)
        model = create_random(tempFolder / "tiny-svdrr", "tiny", 32)
        status = logic.modelStatus("", model)
        self.assertTrue(status.available, status.message)

        job, info = logic.startSynthesis(drrNode, status.model, logic.synthesisViews(0.0, 0.0, "arc:-30:30:30"),
                                         tempFolder, steps=3)
        job.wait(timeout=600)
        logic.cleanupJob(info)
        self.assertEqual(job.state, "finished", job.error)
        imported = logic.importSynthesis(job.result, "Test views")
        self.assertEqual(imported.count, 3)
        item = imported.sequence.GetNthDataNode(2)
        self.assertEqual(geometry_from_node(item).azimuth, 30.0)
        self.assertEqual(item.GetAttribute("SVDRR.Kind"), "Synthesized X-ray")
        self.assertEqual(item.GetAttribute("SVDRR.Synthetic"), "true")

        job, info = logic.startSynthesis(drrNode, status.model, logic.synthesisViews(20.0, -5.0), tempFolder, steps=2)
        job.wait(timeout=600)
        logic.cleanupJob(info)
        self.assertEqual(job.state, "finished", job.error)
        (node,) = logic.importSynthesis(job.result, "Test view").nodes
        self.assertTrue(node.GetName().endswith("(synthetic)"))
        self.assertEqual((geometry_from_node(node).azimuth, geometry_from_node(node).elevation), (20.0, -5.0))
        self.delayDisplay("Novel-view test passed")

    def test_SVDRRSlicer_reconstruction(self):
        """A CT from a PA and a lateral DRR with a tiny random DVG-Diffusion model (the CT is noise from random
        weights; the plumbing is real): views read from the DRR nodes, the worker, the import over the phantom."""
        self.delayDisplay("Starting the SVDRR reconstruction test")
        logic = SVDRRSlicerLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        from SVDRRLogic.models.dvg import create_random

        ctNode = logic.loadChestPhantom(shape=(48, 96, 96), spacing=(3.7, 3.7, 6.7))
        _session, frontal = self._smallView(logic, ctNode)
        frontalNode = logic.renderDRR(frontal)
        lateralNode = logic.renderDRR(frontal.with_view(90.0, 0.0))
        self.assertFalse(logic.reconstructionInput(frontalNode).needsView)
        self.assertFalse(logic.reconstructionInput(ctNode).usable)
        tempFolder = pathlib.Path(slicer.util.tempDirectory("SVDRR-test"))
        model = create_random(tempFolder / "tiny-dvg", "tiny")
        self.assertFalse(logic.reconstructionModelStatus("3D patch EDM", "", model).available)
        status = logic.reconstructionModelStatus("DVG-Diffusion", "", model)
        self.assertTrue(status.available, status.message)

        job, info = logic.startReconstruction([frontalNode, lateralNode], [None, None], status.model, "DVG-Diffusion",
                                              tempFolder, steps=2, referenceCtNode=ctNode)
        job.wait(timeout=600)
        logic.cleanupJob(info)
        self.assertEqual(job.state, "finished", job.error)
        node = logic.importReconstruction(job.result, info["name"], info["referenceId"])
        self.assertTrue(node.GetName().endswith("(synthetic)"))
        self.assertEqual(node.GetAttribute("SVDRR.Kind"), "Reconstructed CT")
        self.assertEqual(node.GetAttribute("SVDRR.Synthetic"), "true")
        self.assertIs(node.GetNodeReference("SVDRR.ReferenceCT"), ctNode)
        self.assertEqual(slicer.util.arrayFromVolume(node).shape, (16, 16, 16))
        self.delayDisplay("Reconstruction test passed")
