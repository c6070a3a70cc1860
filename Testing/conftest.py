"""Fixtures shared by several test modules; a module opts in with ``pytestmark = pytest.mark.usefixtures(...)``."""
import pytest


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny networks: they gain nothing from two, and on a shared 2-core machine
    spinning OpenMP threads can make a training step ten times slower. Restored for the next module."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty model cache per test, and the environment's offline switches off (nothing here downloads)."""
    for var in ("SVDRR_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SVDRR_HOME", str(tmp_path / "svdrr-home"))
