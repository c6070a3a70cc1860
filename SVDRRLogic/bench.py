"""``svdrr bench``: projector speed, memory and accuracy, side by side with the peers installed here.

Speed: milliseconds per view for single views and batches at each detector size, on the CPU and on CUDA when
present, for a 512x512x133 chest CT (the LIDC CT beside the project, upsampled to its original grid, else a phantom
of that size). Peers (plastimatch's exact ray tracer, DiffDRR's trilinear renderer) render the same CT, geometry and
detector in the same run, in interleaved rounds (each renderer once per round), so all of them meet the same
machine. Accuracy: every renderer against exact line integrals through a voxelized ellipsoid,
so "faster" is always read next to "as accurate".
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import torch

from . import peers
from .geometry import CArmGeometry
from .images import CTVolume
from .phantoms import analytic
from .renderer import DRRRenderer, describe_device, resolve_device

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc0001_256.nii.gz"
DETECTOR_MM = 358.4  # the svdrr-lidc detector width


def bench_ct(path: str | None, log: TextIO) -> CTVolume:
    """The CT to time: ``path``, else LIDC-IDRI-0001 upsampled to 512x512x133, else a phantom of that grid."""
    from scipy.ndimage import zoom

    from .io import load_ct
    from .phantoms import chest_phantom

    if path:
        return load_ct(path)
    if LIDC.exists():
        ct = load_ct(LIDC)
        print(f"bench: {LIDC.name} upsampled in-plane to 512x512x133 (its original grid)", file=log)
        m = ct.ijk_to_ras.copy()
        m[:3, 3] -= (m[:3, 0] + m[:3, 1]) / 4.0  # half-size voxels inside the same outer boundary
        m[:3, :2] /= 2.0
        hu = zoom(ct.array_hu, (1, 2, 2), order=1, grid_mode=True, mode="nearest")
        return CTVolume(hu, m, source=f"{ct.source} (x2 in-plane)")
    print("bench: shared LIDC CT not found; using a 512x512x133 chest phantom", file=log)
    return chest_phantom(shape=(133, 512, 512), spacing=(0.703, 0.703, 2.5), seed=0)


class PeakMemory:
    """Peak memory above the starting level during a block: CUDA allocator peak, or on Linux the process's
    resident high-water mark (reset through /proc/self/clear_refs, so no polling thread competes for the cores
    being timed); NaN where neither is available.

    The block includes the first (warm-up) call, so a setting's first row also counts the plane stacks the
    renderer builds and keeps (about 1x the volume for ``oversample=1``, 2x for 2); later rows reuse them.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = _reset_high_water_mark()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        elif self._base is not None:
            self.peak_mib = max(0.0, (_status_kib("VmHWM") * 1024 - self._base) / 2**20)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_high_water_mark() -> int | None:
    """Reset the resident high-water mark to the current RSS and return it in bytes; None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, StopIteration):
        return None


def _timer(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """Seconds of one call of ``fn``, waiting for the device to finish."""
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    return timed


def open_peers(ct: CTVolume, wanted: bool, log: TextIO) -> dict:
    """The installed peers, each with ``ct`` prepared once (setup is not part of the timings)."""
    opened = {}
    for name, cls in peers.PEER_CLASSES.items() if wanted else ():
        ok, why = peers.available(name)
        if ok:
            opened[name] = cls(ct)
        else:
            print(f"bench: {name} skipped ({why})", file=log)
    return opened


def close_peer(peer) -> None:
    if hasattr(peer, "close"):
        peer.close()


def _geometry(ct: CTVolume, size: int) -> CArmGeometry:
    return CArmGeometry.preset("svdrr-lidc", isocenter=tuple(ct.center_ras), detector=(size, size),
                               pixel=(DETECTOR_MM / size,) * 2)


def _svdrr_cases(ct: CTVolume, size: int, batch: int, dev: torch.device, label: str = "") -> list[tuple]:
    """(row, timer, rounds) for single views and a batch, accurate (oversample 2) and live preview (oversample 1).

    The warm-up call that builds the plane stacks runs here, under :class:`PeakMemory`.
    """
    renderer = DRRRenderer(ct, device=dev)
    geom = _geometry(ct, size)
    sets = [[geom]] + ([[geom.with_view(a, 0.0) for a in np.linspace(-40, 40, batch)]] if batch > 1 else [])
    cases = []
    for name, oversample in (("svdrr", 2), ("svdrr fast", 1)):
        for views in sets:
            def render(views=views, oversample=oversample):
                return renderer.render_tensor(views, oversample=oversample)
            with PeakMemory(dev) as mem:
                render()
            cases.append((dict(renderer=name, device=describe_device(dev), size=size, views=len(views),
                               peak_mib=mem.peak_mib, ct=label), _timer(render, dev), None))
    return cases


def _peer_cases(peers_open: dict, ct: CTVolume, size: int, rounds: int) -> list[tuple]:
    """(row, timer, rounds) per peer; a peer's time is its own render time (see :mod:`peers`)."""
    geom = _geometry(ct, size)
    cases = []
    for name, peer in peers_open.items():
        peer.render(geom)  # warm-up, like ours
        cases.append((dict(renderer=name, device="cpu", size=size, views=1, peak_mib=float("nan"), ct=""),
                       lambda peer=peer: peer.render(geom).seconds, rounds))
    return cases


def _timed_rows(cases: list[tuple], repeat: int) -> list[dict]:
    """Medians over ``repeat`` rounds in which every case runs once in turn, so that a slow moment of a shared
    machine falls on all renderers alike; a case with a round limit (the slow peers) sits out later rounds."""
    times: list[list[float]] = [[] for _ in cases]
    for r in range(repeat):
        for (_, timer, rounds), t in zip(cases, times):
            if rounds is None or r < rounds:
                t.append(timer())
    return [dict(row, ms_per_view=statistics.median(t) / row["views"] * 1e3)
            for (row, _, _), t in zip(cases, times)]


def speed_rows(ct: CTVolume, sizes: list[int], batch: int, repeat: int, devices: list[torch.device],
               with_peers: bool, log: TextIO) -> list[dict]:
    peers_open = open_peers(ct, with_peers, log)
    rows = []
    for size in sizes:
        cases = [c for dev in devices for c in _svdrr_cases(ct, size, batch, dev)]
        rows += _timed_rows(cases + _peer_cases(peers_open, ct, size, rounds=3), repeat)
        print(f"bench: {size}px done", file=log)
    for peer in peers_open.values():
        close_peer(peer)
    return rows


def large_rows(devices: list[torch.device], log: TextIO) -> list[dict]:
    """Bounded memory: a 512x512x500 CT at 1024^2 (and, on a GPU, a 512^3 CT at 512^2, the 5 ms target)."""
    from .phantoms import chest_phantom

    rows = []
    big = chest_phantom(shape=(500, 512, 512), spacing=(0.7, 0.7, 0.7), seed=1)
    for dev in devices:
        rows += _timed_rows(_svdrr_cases(big, 1024, 1, dev, label="512x512x500"), 1)
        if dev.type == "cuda":
            cube = chest_phantom(shape=(512, 512, 512), spacing=(0.7, 0.7, 0.7), seed=2)
            rows += _timed_rows(_svdrr_cases(cube, 512, 8, dev, label="512^3"), 10)
        print(f"bench: large CT on {dev.type} done", file=log)
    return rows


def accuracy_rows(with_peers: bool, log: TextIO) -> list[dict]:
    """Error against exact chords of an ellipsoid (60/45/70 mm, mu 0.02/mm) voxelized at 1 mm, oblique view."""
    ell = analytic.single_ellipsoid()
    ct = analytic.voxelize(ell, shape=(160, 160, 160), spacing=(1.0, 1.0, 1.0), supersample=4)
    geom = CArmGeometry(azimuth=23.0, elevation=-11.0, sad=850.0, sdd=1020.0, detector=(256, 256),
                        pixel=(1.2, 1.2), isocenter=tuple(ct.center_ras))
    origins, directions = geom.rays()
    truth = analytic.line_integrals(ell, origins, directions).reshape(geom.shape)
    inside = analytic.rays_away_from_rim(ell, origins, directions, margin_mm=2.0).reshape(geom.shape)
    inside &= truth > 0.05 * truth.max()
    renderer = DRRRenderer(ct, device="cpu")
    images = {"svdrr": renderer.render(geom), "svdrr fast": renderer.render(geom, oversample=1)}
    for name, peer in open_peers(ct, with_peers, log).items():
        images[name] = peer.render(geom).image
        close_peer(peer)
    rows = []
    for name, image in images.items():
        err = (image[inside] - truth[inside]) / truth[inside]
        rows.append(dict(renderer=name, median_rel_err_pct=float(np.median(np.abs(err)) * 100),
                         rel_rmse_pct=float(np.sqrt(np.mean(err ** 2)) * 100), rays=int(inside.sum())))
    return rows


def format_table(result: dict) -> str:
    lines = [f"CT {result['ct']}", "",
             f"{'renderer':<12}{'device':<22}{'CT':<13}{'detector':>9}{'views':>7}{'ms/view':>11}{'peak MiB':>10}"]
    for r in result["speed"]:
        lines.append(f"{r['renderer']:<12}{r['device']:<22}{r['ct'] or 'bench CT':<13}{r['size']:>6}^2 "
                     f"{r['views']:>6}{r['ms_per_view']:>11.1f}{r['peak_mib']:>10.0f}")
    lines += ["", "accuracy vs exact ellipsoid chords (1 mm voxels, 256^2, oblique cone beam, rim excluded)",
              f"{'renderer':<12}{'median rel err %':>18}{'rel RMSE %':>12}"]
    for r in result["accuracy"]:
        lines.append(f"{r['renderer']:<12}{r['median_rel_err_pct']:>18.3f}{r['rel_rmse_pct']:>12.3f}")
    return "\n".join(lines)


def run_bench(ct_path: str | None = None, sizes: list[int] = (256, 512), batch: int = 8, repeat: int = 5,
              device: str = "auto", peers: bool = True, large: bool = True, log: TextIO = sys.stderr) -> dict:
    if any(s < 8 or s > 4096 for s in sizes) or batch < 1 or repeat < 1:
        raise ValueError("bench sizes must be 8-4096 pixels, batch and repeat at least 1")
    dev = resolve_device(device)
    devices = [torch.device("cpu")] + ([dev] if dev.type == "cuda" else [])
    if device == "cuda":
        devices = [dev]
    ct = bench_ct(ct_path, log)
    result = {"ct": f"{ct.source} {ct.shape[2]}x{ct.shape[1]}x{ct.shape[0]}",
              "threads": torch.get_num_threads(),
              "speed": speed_rows(ct, list(sizes), batch, repeat, devices, peers, log)
              + (large_rows(devices, log) if large else []),
              "accuracy": accuracy_rows(peers, log)}
    result["table"] = format_table(result)
    return result
