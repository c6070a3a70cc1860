"""Reference renderers ("peers"): the same CT and C-arm view rendered by plastimatch and by DiffDRR.

Used by ``svdrr bench`` (speed and accuracy side by side) and by the tests that pin our geometry convention
against independent code. Each peer is optional: importing this module never imports or runs a peer;
:func:`available` says whether one can be used here and, if not, why.

Every result is an image in *our* convention (DESIGN.md section 3): ``image[row, col]`` with the column axis along
``geometry.u`` and the row axis along ``geometry.v``, holding line integrals in mu*mm of the same attenuation
volume our renderer integrates (see ``hu_model`` below), so images can be compared pixel by pixel.

How each peer is driven (all measured with plastimatch 1.9.4 and DiffDRR 0.6.1):

plastimatch ``drr``
    * The CT is written as an MHA with an identity (LPS) direction matrix, because plastimatch ignores the
      direction and returns a blank DRR otherwise: axis-aligned volumes are reoriented with
      ``SimpleITK.DICOMOrient(.., "LPS")``, oblique ones resampled (linear) onto an LPS-aligned grid.
    * ``--nrm`` is our source direction ``s`` and ``--vup`` is ``-v``, both in LPS; ``-o`` is the isocenter in
      LPS; the source is at ``iso + SAD nrm``. plastimatch's first image axis is "panel right" = ``vup x nrm``,
      which is ``-u``: its image is seen from the source, ours from behind the detector, so columns are flipped
      on reading. Rows (towards ``-vup`` = ``v``) need no flip; the file stores the top row first.
    * ``-r`` and ``-z`` are given as "columns rows" (width first), although plastimatch's help says
      "row col": with ``-r "30 40"`` it writes a PFM of width 30 and height 40, whose column pitch is the first
      ``-z`` value over 30. The default image centre ((W-1)/2, (H-1)/2) matches ours.
    * plastimatch divides every line integral by 10 ("mm to cm"); the values are multiplied back by 10.
    * Two differences in what is integrated, both plastimatch's: it traces each ray through the whole volume,
      also past the detector when the detector plane cuts the volume (ours and DiffDRR stop at the detector;
      ``details["beyond_detector"]`` gives the fraction of the volume's attenuation lying past the detector
      plane, where the images will differ), and its exact tracer bounds the volume at the outermost voxel
      *centres*, losing half a voxel at each face (a uniform 40-voxel cube integrates to 39 voxels).
    * ``-P none`` integrates the volume as written; with ``hu_model="plastimatch"`` the HU volume is written and
      plastimatch's own ``-P preprocess`` applies mu = 0.022/mm * (1 + HU/1000), 0 for HU <= -800.
    * ``seconds`` is plastimatch's own "Total time" minus its "I/O time" (rendering only).

DiffDRR (``renderer="trilinear"`` or ``"siddon"``)
    * The subject is made from the CTVolume with ``diffdrr.data.read(ScalarImage(tensor, affine=ijk_to_ras),
      orientation=None, center_volume=False)``: no centring, no reorientation, so DiffDRR's world is our RAS.
    * DiffDRR's camera frame has the source at the origin and pixel (row r, col c) at
      ``(delx (c - (W-1)/2), -dely (r - (H-1)/2), sdd)`` with ``reverse_x_axis=False``; the pose is the
      rigid matrix taking camera x, y, z to ``u``, ``-v``, ``-s`` and the origin to the source. That is a proper
      rotation, so the image comes back in our orientation with no flip.
    * ``seconds`` is timed around the render call (the subject and the module are built outside it).

``hu_model`` (for ``units == "hu"`` volumes): ``physical`` or ``diffdrr`` convert HU with
:func:`SVDRRLogic.attenuation.hu_to_mu` before the peer sees the volume, except that DiffDRR with ``diffdrr`` uses
DiffDRR's own ``transform_hu_to_density`` (so comparing it with ours checks our copy of that mapping); and
``plastimatch`` (plastimatch only) uses plastimatch's own conversion. ``units == "mu"`` volumes are integrated as
they are.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .attenuation import apply_output, hu_to_mu
from .geometry import CArmGeometry
from .images import CTVolume

PEERS = ("plastimatch", "diffdrr")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: plastimatch divides each line integral by 10 (drr.cxx: "Translate from mm pixels to cm*gm").
PLASTIMATCH_SCALE = 10.0


class PeerError(RuntimeError):
    """A peer is missing or failed; the message says which and what it reported."""


class Availability(NamedTuple):
    """``ok`` and, when not ok, a one-line ``reason``; truthy when the peer can be used."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class PeerResult:
    """A peer's rendering of one view, in our orientation (``image[row, col]``, row axis v, column axis u)."""

    image: np.ndarray
    seconds: float
    wall_seconds: float
    peer: str
    details: dict[str, Any] = field(default_factory=dict)


# -- availability -------------------------------------------------------------------------------------------
def plastimatch_executable() -> str | None:
    """``$SVDRR_PLASTIMATCH`` if set, else ``plastimatch`` on the PATH."""
    exe = os.environ.get("SVDRR_PLASTIMATCH") or "plastimatch"
    return shutil.which(exe)


def plastimatch_available() -> Availability:
    exe = plastimatch_executable()
    if exe is None:
        return Availability(False, "plastimatch is not on the PATH (Debian/Ubuntu: apt-get install plastimatch)")
    if importlib.util.find_spec("SimpleITK") is None:
        return Availability(False, "SimpleITK is not installed (needed to write the volume for plastimatch)")
    return Availability(True, exe)


def diffdrr_available() -> Availability:
    for module in ("diffdrr", "torchio"):
        if importlib.util.find_spec(module) is None:
            return Availability(False, f"{module} is not installed (pip install --no-deps diffdrr==0.6.1; "
                                       "pip install torchio fastcore einops pandas)")
    try:
        import diffdrr.data  # noqa: F401
        import diffdrr.drr  # noqa: F401
    except Exception as exc:  # a broken install must not break the callers, only this peer
        return Availability(False, f"diffdrr does not import: {type(exc).__name__}: {exc}")
    return Availability(True, "diffdrr " + _diffdrr_version())


def available(peer: str) -> Availability:
    """Whether ``peer`` (one of :data:`PEERS`) can render here, with the reason when it cannot."""
    if peer == "plastimatch":
        return plastimatch_available()
    if peer == "diffdrr":
        return diffdrr_available()
    raise ValueError(f"unknown peer {peer!r}; choose one of {', '.join(PEERS)}")


def _diffdrr_version() -> str:
    try:
        from importlib.metadata import version
        return version("diffdrr")
    except Exception:
        return "(version unknown)"


# -- shared helpers -----------------------------------------------------------------------------------------
def attenuation_values(ct: CTVolume, hu_model: str) -> np.ndarray:
    """The volume a peer integrates: our ``hu_to_mu`` of a HU CT, or a ``mu`` volume as it is ([k, j, i])."""
    if ct.units == "mu":
        return ct.array_hu
    return hu_to_mu(ct.array_hu, hu_model)


def _finish(image: np.ndarray, output: str) -> np.ndarray:
    if output == "line-integral":
        return np.ascontiguousarray(image, dtype=np.float32)
    import torch
    return apply_output(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), output).numpy()


# -- plastimatch --------------------------------------------------------------------------------------------
def lps_identity_image(values: np.ndarray, ijk_to_ras: np.ndarray, fill: float = 0.0):
    """A SimpleITK image of ``values`` [k, j, i] whose direction is exactly the identity in LPS.

    Axis-aligned volumes are only permuted/flipped (``DICOMOrient``), so no value changes; oblique ones are
    resampled with linear interpolation onto an LPS-aligned grid of the same spacing covering the whole volume,
    ``fill`` outside it.
    """
    import SimpleITK as sitk

    m = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = _RAS_TO_LPS @ (m[:3, :3] / spacing)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise PeerError("the CT's voxel axes are not orthogonal; plastimatch needs an orthogonal grid")
    img = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    img.SetSpacing(spacing.tolist())
    img.SetOrigin((_RAS_TO_LPS @ m[:3, 3]).tolist())
    img.SetDirection(direction.ravel().tolist())
    if not np.allclose(direction, np.eye(3), atol=1e-6):
        img = sitk.DICOMOrient(img, "LPS")
    d = np.array(img.GetDirection()).reshape(3, 3)
    if np.allclose(d, np.eye(3), atol=1e-6):
        img.SetDirection(np.eye(3).ravel().tolist())
        return img
    # oblique: resample onto an axis-aligned LPS grid spanning the voxel boxes' corners
    size = np.array(img.GetSize())
    sp = np.array(img.GetSpacing())
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint([float(x) for x in c])
                        for c in np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in size])).reshape(3, -1).T])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    new_size = np.maximum(1, np.ceil((hi - lo) / sp - 1e-6)).astype(int)
    ref = sitk.Image([int(n) for n in new_size], sitk.sitkFloat32)
    ref.SetSpacing(sp.tolist())
    ref.SetOrigin((lo + sp / 2).tolist())
    ref.SetDirection(np.eye(3).ravel().tolist())
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, float(fill), sitk.sitkFloat32)


def beyond_detector_fraction(values: np.ndarray, ijk_to_ras: np.ndarray, geometry: CArmGeometry) -> float:
    """Fraction of the total (non-negative) attenuation of ``values`` [k, j, i] whose voxel centres lie past the
    detector plane, seen from the source. Rays stop at the detector in our renderer and in DiffDRR but not in
    plastimatch; with SV-DRR's geometry (detector 150 mm from the isocenter) a chest CT crosses the detector
    plane at oblique views."""
    beam = -geometry.source_direction
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    coef = beam @ m[:3, :3]  # distance along the beam per unit i, j, k
    offset = beam @ (m[:3, 3] - geometry.detector_center)
    nk, nj, ni = values.shape
    plane = coef[0] * np.arange(ni)[None, :] + coef[1] * np.arange(nj)[:, None] + offset
    total = beyond = 0.0
    for k in range(nk):
        v = np.clip(values[k], 0.0, None)
        total += float(v.sum())
        beyond += float(v[plane + coef[2] * k > 0].sum())
    return beyond / total if total > 0 else 0.0


def plastimatch_arguments(geometry: CArmGeometry, algorithm: str = "exact", hu_conversion: str = "none") -> list[str]:
    """The ``plastimatch drr`` options that reproduce ``geometry`` (input/output options excluded)."""
    w, h = geometry.detector
    du, dv = geometry.pixel
    nrm = _RAS_TO_LPS @ geometry.source_direction
    vup = _RAS_TO_LPS @ -geometry.v
    iso = _RAS_TO_LPS @ np.asarray(geometry.isocenter, dtype=np.float64)
    f = lambda xs: " ".join(f"{x:.10g}" for x in xs)  # noqa: E731
    return ["-t", "pfm", "-i", algorithm, "-P", hu_conversion,
            "--sad", f"{geometry.sad:.10g}", "--sid", f"{geometry.sdd:.10g}",
            "-r", f"{int(w)} {int(h)}", "-z", f(((w * du), (h * dv))),
            "--nrm", f(nrm + 0.0), "--vup", f(vup + 0.0), "-o", f(iso + 0.0)]


def read_pfm(path: str | Path) -> np.ndarray:
    """A plastimatch PFM as [row, col], top row (towards ``--vup``) first, as plastimatch writes it."""
    data = Path(path).read_bytes()
    header, pos = [], 0
    while len(header) < 3:
        end = data.index(b"\n", pos)
        header.append(data[pos:end].decode("ascii").strip())
        pos = end + 1
    if header[0] != "Pf":
        raise PeerError(f"{path}: not a grey-scale PFM (header {header[0]!r})")
    w, h = (int(x) for x in header[1].split())
    dtype = "<f4" if float(header[2]) < 0 else ">f4"
    return np.frombuffer(data, dtype=dtype, count=w * h, offset=pos).reshape(h, w).astype(np.float32)


class PlastimatchPeer:
    """One CT written once for plastimatch, rendered for any number of views (a temporary folder, removed by
    :meth:`close` or on leaving a ``with`` block)."""

    def __init__(self, ct: CTVolume, hu_model: str = "physical", algorithm: str = "exact",
                 threads: int | None = None, workdir: str | Path | None = None):
        ok, why = plastimatch_available()
        if not ok:
            raise PeerError(why)
        if algorithm not in ("exact", "uniform"):
            raise ValueError(f"plastimatch algorithm must be 'exact' or 'uniform', not {algorithm!r}")
        self.executable = why
        self.algorithm = algorithm
        self.threads = threads
        self._tmp = tempfile.TemporaryDirectory(prefix="svdrr-plastimatch-", dir=workdir)
        self.folder = Path(self._tmp.name)
        self.volume_path = self.folder / "volume.mha"
        import SimpleITK as sitk

        if ct.units == "hu" and hu_model == "plastimatch":
            values, fill, self.hu_conversion = ct.array_hu, -1000.0, "preprocess"
        else:
            values, fill, self.hu_conversion = attenuation_values(ct, hu_model), 0.0, "none"
        self.hu_model = "mu" if ct.units == "mu" else hu_model
        sitk.WriteImage(lps_identity_image(values, ct.ijk_to_ras, fill), str(self.volume_path))
        self._attenuation = values if self.hu_conversion == "none" else np.clip(1.0 + values / 1000.0, 0.0, None)
        self._ijk_to_ras = np.asarray(ct.ijk_to_ras, dtype=np.float64)
        self._count = 0

    def command(self, geometry: CArmGeometry, prefix: str) -> list[str]:
        return [self.executable, "drr", *plastimatch_arguments(geometry, self.algorithm, self.hu_conversion),
                "-O", prefix, "-I", str(self.volume_path)]

    def render(self, geometry: CArmGeometry, output: str = "line-integral") -> PeerResult:
        t0 = time.perf_counter()
        prefix = str(self.folder / f"view{self._count:05d}_")
        self._count += 1
        cmd = self.command(geometry, prefix)
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(int(self.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        out_path = Path(prefix + "0000.pfm")
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise PeerError(f"plastimatch drr failed (exit {proc.returncode}): {' | '.join(tail)}")
        raw = read_pfm(out_path)
        for p in self.folder.glob(Path(prefix).name + "*"):
            p.unlink()
        h, w = geometry.shape
        if raw.shape != (h, w):
            raise PeerError(f"plastimatch wrote a {raw.shape} image for a {h}x{w} detector")
        image = raw[:, ::-1] * PLASTIMATCH_SCALE
        wall = time.perf_counter() - t0
        total = re.search(r"Total time:\s*([0-9.eE+-]+)", proc.stdout)
        io = re.search(r"I/O time:\s*([0-9.eE+-]+)", proc.stdout)
        seconds = float(total.group(1)) - (float(io.group(1)) if io else 0.0) if total else wall
        beyond = beyond_detector_fraction(self._attenuation, self._ijk_to_ras, geometry)
        return PeerResult(_finish(image, output), seconds, wall, "plastimatch",
                          dict(command=cmd, hu_model=self.hu_model, algorithm=self.algorithm, beyond_detector=beyond))

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "PlastimatchPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def render_plastimatch(ct: CTVolume, geometry: CArmGeometry, hu_model: str = "physical", algorithm: str = "exact",
                       output: str = "line-integral", threads: int | None = None) -> PeerResult:
    """One view by plastimatch ``drr`` (exact Siddon by default); ``wall_seconds`` includes writing the CT."""
    t0 = time.perf_counter()
    with PlastimatchPeer(ct, hu_model, algorithm, threads) as peer:
        res = peer.render(geometry, output)
    return PeerResult(res.image, res.seconds, time.perf_counter() - t0, res.peer, res.details)


# -- DiffDRR ------------------------------------------------------------------------------------------------
def diffdrr_pose_matrix(geometry: CArmGeometry) -> np.ndarray:
    """4x4 taking DiffDRR's camera frame (``reverse_x_axis=False``) to RAS: x -> u, y -> -v, z -> -s, 0 -> S."""
    m = np.eye(4)
    m[:3, 0] = geometry.u
    m[:3, 1] = -geometry.v
    m[:3, 2] = -geometry.source_direction
    m[:3, 3] = geometry.source
    return m


class DiffDRRPeer:
    """A CT prepared once as a DiffDRR subject; :meth:`render` builds (and caches) a ``DRR`` per detector."""

    def __init__(self, ct: CTVolume, hu_model: str = "physical", renderer: str = "trilinear", device: str = "cpu",
                 n_points: int = 500, patch_size: int | None = None):
        ok, why = diffdrr_available()
        if not ok:
            raise PeerError(why)
        import torch
        from diffdrr.data import read
        from torchio import ScalarImage

        self.device = torch.device(device)
        self.renderer = renderer
        self.n_points = n_points
        self.patch_size = patch_size
        self.hu_model = "mu" if ct.units == "mu" else hu_model
        own = ct.units == "hu" and hu_model == "diffdrr"  # DiffDRR's own transform_hu_to_density
        values = ct.array_hu if own else attenuation_values(ct, hu_model)
        tensor = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.float32))[None]
        self.subject = read(ScalarImage(tensor=tensor, affine=np.asarray(ct.ijk_to_ras, dtype=np.float64)),
                            orientation=None, center_volume=False)
        if not own:
            self.subject.density.set_data(tensor.clone())
        self._drrs: dict[tuple, Any] = {}

    def _drr(self, geometry: CArmGeometry):
        from diffdrr.drr import DRR

        w, h = geometry.detector
        du, dv = geometry.pixel
        key = (geometry.sdd, int(h), int(w), du, dv)
        if key not in self._drrs:
            self._drrs[key] = DRR(self.subject, sdd=geometry.sdd, height=int(h), width=int(w), delx=du, dely=dv,
                                  reverse_x_axis=False, renderer=self.renderer,
                                  patch_size=self.patch_size).to(self.device)
        return self._drrs[key]

    def render(self, geometry: CArmGeometry, output: str = "line-integral") -> PeerResult:
        import torch

        t0 = time.perf_counter()
        drr = self._drr(geometry)
        pose = torch.as_tensor(diffdrr_pose_matrix(geometry), dtype=torch.float32, device=self.device)[None]
        kwargs = {"n_points": self.n_points} if self.renderer == "trilinear" else {}
        with torch.no_grad():
            _sync(self.device)
            t1 = time.perf_counter()
            img = drr(pose, parameterization="matrix", **kwargs)
            _sync(self.device)
            seconds = time.perf_counter() - t1
        image = img[0, 0].float().cpu().numpy()
        return PeerResult(_finish(image, output), seconds, time.perf_counter() - t0, "diffdrr",
                          dict(renderer=self.renderer, hu_model=self.hu_model, n_points=self.n_points,
                               version=_diffdrr_version()))


def _sync(device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def render_diffdrr(ct: CTVolume, geometry: CArmGeometry, hu_model: str = "physical", renderer: str = "trilinear",
                   output: str = "line-integral", device: str = "cpu", n_points: int = 500,
                   patch_size: int | None = None) -> PeerResult:
    """One view by DiffDRR (trilinear, 500 samples per ray by default); ``wall_seconds`` includes the setup."""
    t0 = time.perf_counter()
    res = DiffDRRPeer(ct, hu_model, renderer, device, n_points, patch_size).render(geometry, output)
    return PeerResult(res.image, res.seconds, time.perf_counter() - t0, res.peer, res.details)


#: name -> peer class: ``Peer(ct)`` prepares the CT once, ``.render(geometry)`` returns a PeerResult.
PEER_CLASSES: dict[str, Callable[..., Any]] = {"plastimatch": PlastimatchPeer, "diffdrr": DiffDRRPeer}
