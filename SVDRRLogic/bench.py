"""``svdrr bench``: projector speed, memory and accuracy, side by side with the peers installed here.

Speed: milliseconds per view for single views and batches at each detector size, on the CPU and on CUDA when
present, for a 512x512x133 chest CT (the LIDC CT beside the project, upsampled to its original grid, else a phantom
of that size). Peers (plastimatch's exact ray tracer, DiffDRR's trilinear renderer) render the same CT, geometry and
detector in the same run. Accuracy: every renderer against exact line integrals through a voxelized ellipsoid,
so "faster" is always read next to "as accurate".
"""
from __future__ import annotations

import statistics
import sys
import threading
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
    """Peak memory above the starting level during a block: CUDA allocator peak, or process RSS on Linux.

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
            self._base, self._peak, self._stop = _rss(), _rss(), threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (max(self._peak, _rss()) - self._base) / 2**20


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def _svdrr_rows(ct: CTVolume, sizes: list[int], batch: int, repeat: int, dev: torch.device, log: TextIO,
                label: str = "") -> list[dict]:
    """Single views and a batch, accurate (oversample 2) and live-preview (oversample 1) settings."""
    rows = []
    renderer = DRRRenderer(ct, device=dev)
    for size in sizes:
        geom = _geometry(ct, size)
        sets = [[geom]] + ([[geom.with_view(a, 0.0) for a in np.linspace(-40, 40, batch)]] if batch > 1 else [])
        for name, oversample in (("svdrr", 2), ("svdrr fast", 1)):
            for views in sets:
                with PeakMemory(dev) as mem:
                    seconds = _time(lambda: renderer.render_tensor(views, oversample=oversample), dev, repeat)
                rows.append(dict(renderer=name, device=describe_device(dev), size=size, views=len(views),
                                 ms_per_view=seconds / len(views) * 1e3, peak_mib=mem.peak_mib, ct=label))
        print(f"bench: svdrr {dev.type} {size}px done", file=log)
    return rows


def speed_rows(ct: CTVolume, sizes: list[int], batch: int, repeat: int, devices: list[torch.device],
               with_peers: bool, log: TextIO) -> list[dict]:
    rows = []
    for dev in devices:
        rows += _svdrr_rows(ct, sizes, batch, repeat, dev, log)
    for name, peer in open_peers(ct, with_peers, log).items():
        for size in sizes:
            results = [peer.render(_geometry(ct, size)) for _ in range(max(1, min(repeat, 3)))]
            rows.append(dict(renderer=name, device="cpu", size=size, views=1,
                             ms_per_view=statistics.median(r.seconds for r in results) * 1e3,
                             peak_mib=float("nan"), ct=""))
            print(f"bench: {name} {size}px done", file=log)
        close_peer(peer)
    return rows


def large_rows(devices: list[torch.device], log: TextIO) -> list[dict]:
    """Bounded memory: a 512x512x500 CT at 1024^2 (and, on a GPU, a 512^3 CT at 512^2, the 5 ms target)."""
    from .phantoms import chest_phantom

    rows = []
    big = chest_phantom(shape=(500, 512, 512), spacing=(0.7, 0.7, 0.7), seed=1)
    for dev in devices:
        rows += _svdrr_rows(big, [1024], 1, 1, dev, log, label="512x512x500")
        if dev.type == "cuda":
            cube = chest_phantom(shape=(512, 512, 512), spacing=(0.7, 0.7, 0.7), seed=2)
            rows += _svdrr_rows(cube, [512], 8, 10, dev, log, label="512^3")
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
