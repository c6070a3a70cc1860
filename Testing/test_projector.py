"""Projector properties that hold for any volume: adjointness, batching, gradients, bounded chunks, devices."""
import numpy as np
import pytest
import torch

from SVDRRLogic.geometry import CArmGeometry
from SVDRRLogic.images import CTVolume
from SVDRRLogic.projector import back_project, forward_project
from SVDRRLogic.renderer import DRRRenderer


def oblique_volume(shape=(20, 24, 28), seed=0, dtype=np.float32):
    """Random attenuation on an anisotropic, rotated voxel grid, so every axis and sign convention is exercised."""
    rng = np.random.default_rng(seed)
    a = np.radians(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([2.0, -1.5, 2.5])
    m[:3, 3] = [-20.0, 15.0, -25.0]
    return CTVolume(rng.random(shape, dtype=np.float64).astype(dtype) * 0.02, m, units="mu")


VIEWS = [CArmGeometry(az, el, sad=300, sdd=500, detector=(24, 20), pixel=(4.0, 4.0)) for az, el in
         [(0, 0), (37, -12), (-75, 30), (90, 0), (140, 80), (-45, 0)]]


@pytest.mark.parametrize("oversample", [1, 2])
def test_adjoint_identity_float64(oversample):
    """<A x, y> == <x, A^T y> on random data, for views that step along each of the three voxel axes."""
    ct = oblique_volume()
    x = torch.from_numpy(ct.array_hu.astype(np.float64))
    geoms = [g.replace(isocenter=tuple(ct.center_ras)) for g in VIEWS]
    ax = forward_project(x, ct.ijk_to_ras, geoms, oversample=oversample)
    y = torch.rand(ax.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    aty = back_project(y, ct.ijk_to_ras, x.shape, geoms, oversample=oversample)
    lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_adjoint_identity_float32_and_detector_inside_box():
    """Same in float32 (1e-4 as the issue asks), with the detector cutting through the volume so rays stop early."""
    ct = oblique_volume(seed=3)
    geoms = [CArmGeometry(a, 0, sad=300, sdd=310, detector=(16, 16), pixel=(3.0, 3.0),
                          isocenter=tuple(ct.center_ras)) for a in (0, 60, 95)]
    x = torch.from_numpy(ct.array_hu)
    ax = forward_project(x, ct.ijk_to_ras, geoms)
    y = torch.rand(ax.shape, generator=torch.Generator().manual_seed(2))
    aty = back_project(y, ct.ijk_to_ras, x.shape, geoms)
    lhs, rhs = float((ax.double() * y.double()).sum()), float((x.double() * aty.double()).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


def test_gradient_is_the_back_projection():
    ct = oblique_volume(seed=5)
    geoms = [g.replace(isocenter=tuple(ct.center_ras)) for g in VIEWS[:3]]
    x = torch.from_numpy(ct.array_hu).requires_grad_()
    y = torch.rand((3, 20, 24), generator=torch.Generator().manual_seed(3))
    (forward_project(x, ct.ijk_to_ras, geoms) * y).sum().backward()
    expected = back_project(y, ct.ijk_to_ras, x.shape, geoms)
    torch.testing.assert_close(x.grad, expected)
    assert x.grad.abs().sum() > 0


def test_batch_equals_single_views_and_chunking_does_not_matter():
    ct = oblique_volume(seed=7)
    geoms = [g.replace(isocenter=tuple(ct.center_ras)) for g in VIEWS]
    r = DRRRenderer(ct, device="cpu")
    batch = r.render(geoms)
    singles = np.stack([r.render(g) for g in geoms])
    np.testing.assert_allclose(batch, singles, rtol=1e-6, atol=1e-7)
    tiny = DRRRenderer(ct, device="cpu", chunk=97).render(geoms)  # many small chunks, ragged edges
    np.testing.assert_allclose(tiny, batch, rtol=1e-5, atol=1e-6)


def test_rays_missing_the_volume_are_zero_and_constant_volume_gives_path_length():
    """A ray through a unit-attenuation box integrates to its geometric length inside the box."""
    m = np.diag([2.0, 2.0, 2.0, 1.0])
    m[:3, 3] = -31.0  # voxel centres -31..31 mm: box [-32, 32]^3
    ct = CTVolume(np.ones((32, 32, 32), np.float32), m, units="mu")
    g = CArmGeometry(0, 0, sad=500, sdd=800, detector=(9, 9), pixel=(20.0, 20.0))
    img = DRRRenderer(ct, device="cpu").render(g)
    # centre pixel: straight through the box along y, 64 mm
    assert img[4, 4] == pytest.approx(64.0, rel=1e-4)
    assert img[0, 0] == 0.0  # that corner ray passes 100 mm off-axis at the isocenter, outside the box


def test_a_view_that_misses_the_volume_is_black():
    """Aiming beside the CT (an isocenter dragged off it) renders zeros, back-projects zeros, and has a gradient."""
    ct = oblique_volume(seed=13)
    g = VIEWS[0].replace(isocenter=tuple(np.asarray(ct.center_ras) + [400.0, 0.0, 0.0]))
    assert not DRRRenderer(ct, device="cpu").render(g).any()
    x = torch.from_numpy(ct.array_hu).requires_grad_()
    forward_project(x, ct.ijk_to_ras, [g]).sum().backward()
    assert x.grad is not None and not x.grad.any()
    assert not back_project(torch.ones((1, 20, 24)), ct.ijk_to_ras, x.shape, [g]).any()


@pytest.mark.parametrize("oversample", [1, 2])
def test_rays_stop_at_a_detector_inside_the_volume(oversample):
    """With the detector cutting through a unit-attenuation box, each ray integrates from where it enters the box
    to its pixel (to within one slice step, Joseph's method having no partial end segment): no plane beyond the
    detector is counted, none is counted twice, whatever the view's stepping axis and the ray order in a batch."""
    m = np.diag([2.0, 2.0, 2.0, 1.0])
    m[:3, 3] = -31.0  # box [-32, 32]^3
    ct = CTVolume(np.ones((32, 32, 32), np.float32), m, units="mu")
    geoms = [CArmGeometry(az, el, sad=300, sdd=310, detector=(7, 7), pixel=(5.0, 5.0))
             for az, el in [(0, 0), (30, 0), (-50, 20), (90, 10), (200, -30)]]
    images = DRRRenderer(ct, device="cpu", chunk=300).render(geoms, oversample=oversample)
    expected = []
    for geom in geoms:
        origins, directions = geom.rays()
        with np.errstate(divide="ignore"):
            t1, t2 = (-32.0 - origins) / directions, (32.0 - origins) / directions
        enter = np.minimum(t1, t2).max(axis=1)  # the source is outside, every pixel inside the box
        expected.append(((1.0 - enter) * np.linalg.norm(directions, axis=1)).reshape(geom.shape))
    np.testing.assert_allclose(images, np.stack(expected), atol=2.5)
    assert np.ptp(expected) > 20.0  # lengths from 36 to 62 mm: a plane beyond the detector would show


def test_outputs():
    ct = oblique_volume(seed=9)
    g = VIEWS[1].replace(isocenter=tuple(ct.center_ras))
    r = DRRRenderer(ct, device="cpu")
    li = r.render(g)
    np.testing.assert_allclose(r.render(g, output="transmission"), np.exp(-li), rtol=1e-6)
    disp = r.render(g, output="display")
    assert disp.min() == pytest.approx(0.0) and disp.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown output"):
        r.render(g, output="negative")


def test_source_inside_volume_and_mixed_detectors_are_refused():
    ct = oblique_volume()
    r = DRRRenderer(ct, device="cpu")
    with pytest.raises(ValueError, match="inside the CT volume"):
        r.render(CArmGeometry(0, 0, sad=10, sdd=100, detector=(4, 4), pixel=(1, 1), isocenter=tuple(ct.center_ras)))
    with pytest.raises(ValueError, match="one detector size"):
        r.render([VIEWS[0], VIEWS[1].replace(detector=(8, 8))])


def test_running_out_of_device_memory_is_advice(monkeypatch):
    """Ray plans live on the device too: memory running out there gives the same advice as in the projection."""
    import SVDRRLogic.renderer as renderer_module

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    ct = oblique_volume(seed=11)
    renderer = DRRRenderer(ct, device="cpu")
    monkeypatch.setattr(renderer_module, "plan_views", exhausted)
    with pytest.raises(RuntimeError, match="out of memory while rendering; render fewer views"):
        renderer.render(VIEWS[0].replace(isocenter=tuple(ct.center_ras)))
    monkeypatch.undo()  # planning works again; now the projection runs out (on a CPU: no smaller chunks to try)
    monkeypatch.setattr(renderer_module, "project_groups", exhausted)
    with pytest.raises(RuntimeError, match="out of memory while rendering"):
        renderer.render(VIEWS[0].replace(isocenter=tuple(ct.center_ras)))


def test_a_gpu_short_of_memory_retries_smaller_chunks_for_that_render_only(monkeypatch):
    """Simulated on the CPU: the renderer believes it is on a GPU whose memory holds only 2^15-sample chunks."""
    import SVDRRLogic.renderer as renderer_module

    real = renderer_module.project_groups
    chunks = []

    def small_gpu(volume, stacks, groups, n_rays, chunk):
        chunks.append(chunk)
        if chunk > 1 << 15:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(volume, stacks, groups, n_rays, chunk)

    ct = oblique_volume(seed=12)
    geometry = VIEWS[0].replace(isocenter=tuple(ct.center_ras))
    expected = DRRRenderer(ct, device="cpu").render(geometry)
    renderer = DRRRenderer(ct, device="cpu", chunk=1 << 19)
    renderer.device = torch.device("cuda")
    plan, cpu = renderer_module.plan_views, torch.device("cpu")  # the ray plan stays where the volume is
    monkeypatch.setattr(renderer_module, "plan_views", lambda g, m, shape, _device, o: plan(g, m, shape, cpu, o))
    monkeypatch.setattr(renderer_module, "project_groups", small_gpu)
    np.testing.assert_allclose(renderer.render(geometry), expected, rtol=1e-5, atol=1e-6)
    assert chunks == [1 << 19, 1 << 17, 1 << 15] and renderer.chunk == 1 << 19  # the next render starts big again


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by test_cpu_and_cuda_agree")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        DRRRenderer(oblique_volume(), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree():
    ct = oblique_volume(shape=(60, 64, 72))
    geoms = [g.replace(isocenter=tuple(ct.center_ras)) for g in VIEWS]
    cpu = DRRRenderer(ct, device="cpu").render(geoms)
    gpu = DRRRenderer(ct, device="cuda").render(geoms)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5)
    y = torch.rand(cpu.shape, generator=torch.Generator().manual_seed(0))
    bp_cpu = back_project(y, ct.ijk_to_ras, ct.shape, geoms)
    bp_gpu = back_project(y.cuda(), ct.ijk_to_ras, ct.shape, geoms).cpu()
    torch.testing.assert_close(bp_gpu, bp_cpu, rtol=1e-4, atol=1e-5)
