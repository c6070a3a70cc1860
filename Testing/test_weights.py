"""Model weights: the catalogue, the cache, downloads (plain HTTP, the Hugging Face hub, embedded folders), sha256
verification, offline mode, and the ``svdrr models`` command line.

Every download comes from HTTP servers on 127.0.0.1 started here. The hub is a fake endpoint (``HF_ENDPOINT``) that
answers the ``/{repo}/resolve/{revision}/{file}`` requests of ``huggingface_hub.hf_hub_download`` the way the real
hub does: ``X-Repo-Commit`` and a git-blob ``ETag`` for small files, and for LFS files a redirect to a CDN (here a
second server, a different origin) carrying ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``.
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from SVDRRLogic import weights
from SVDRRLogic.cli import main
from SVDRRLogic.geometry import preset_names
from SVDRRLogic.weights import Catalogue, WeightsError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = b'{"_class_name": "Tiny", "hidden": 8}\n'
TENSORS = bytes(range(256)) * 40  # stands in for a .safetensors file; its bytes are never parsed here


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeServers:
    """A plain file server, a fake Hugging Face hub and its CDN, each counting the requests it gets."""

    def __init__(self):
        self.files: dict[str, bytes] = {}          # /files/<path>
        self.repos: dict[str, dict[str, bytes]] = {}  # hub repo id -> {path: bytes}
        self.requests: list[tuple[str, str]] = []
        servers = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                servers.handle(self, head=True)

            def do_GET(self):
                servers.handle(self, head=False)

        self.web = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.closed = False
        for s in (self.web, self.cdn):
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web.server_address[1]}"

    def close(self):
        if self.closed:
            return
        self.closed = True
        for s in (self.web, self.cdn):
            s.shutdown()
            s.server_close()

    def reply(self, h, status, headers=(), body=b"", head=False):
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def handle(self, h, head):
        self.requests.append((h.command, h.path))
        parts = h.path.lstrip("/").split("/")
        if parts[0] == "files":
            body = self.files.get("/".join(parts[1:]))
            return self.reply(h, 200, body=body, head=head) if body is not None else self.reply(h, 404, head=head)
        if parts[0] == "cdn":
            for files in self.repos.values():
                for data in files.values():
                    if sha(data) == parts[1]:
                        return self.reply(h, 200, [("Content-Type", "application/octet-stream")], data, head)
            return self.reply(h, 404, head=head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.hub(h, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        self.reply(h, 404, head=head)

    def hub(self, h, repo, revision, path, head):
        if repo not in self.repos:
            return self.reply(h, 401, [("X-Error-Code", "RepoNotFound"), ("X-Error-Message", "Repository not found")],
                              head=head)
        if revision not in ("main", COMMIT):
            return self.reply(h, 404, [("X-Error-Code", "RevisionNotFound"), ("X-Error-Message", "Invalid rev id")],
                              head=head)
        data = self.repos[repo].get(path)
        common = [("X-Repo-Commit", COMMIT)]
        if data is None:
            return self.reply(h, 404, common + [("X-Error-Code", "EntryNotFound"),
                                                ("X-Error-Message", "Entry not found")], head=head)
        if path.endswith(".safetensors"):  # an LFS file: redirect to the CDN, metadata on the redirect itself
            cdn = f"http://127.0.0.1:{self.cdn.server_address[1]}/cdn/{sha(data)}"
            return self.reply(h, 302, common + [("Location", cdn), ("ETag", f'"{sha(data)}"'),
                                                ("X-Linked-Etag", f'"{sha(data)}"'),
                                                ("X-Linked-Size", str(len(data)))], head=head)
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        self.reply(h, 200, common + [("ETag", f'"{git_sha1}"'), ("Content-Type", "text/plain")], data, head)


@pytest.fixture
def servers():
    s = FakeServers()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    for var in ("SVDRR_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SVDRR_HOME", str(tmp_path / "home"))


def entry(source, files, verified=None, **extra):
    if verified is None:
        verified = all(f.get("sha256") and f.get("size") is not None for f in files)
    return {"kind": "svdrr", "source": source, "verified": verified, "files": files, "licence": "MIT",
            "preset": "svdrr-lidc", "normalization": "per-image min-max to [-1, 1]", "resolution": 32, **extra}


def write_catalogue(folder: Path, models: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "models.json"
    path.write_text(json.dumps({"models": models}))
    return path


def f(path, data=None, **kw):
    return {"path": path, "sha256": sha(data) if data is not None else None,
            "size": len(data) if data is not None else None, **kw}


def cached_files(home: Path) -> list[str]:
    return sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------------ catalogue
def test_shipped_catalogue_validates():
    cat = Catalogue.load()
    assert {"svdrr-dit-fb-256", "svdrr-dit-fb-512", "svdrr-dit-fb-1024", "dvg-diffusion"} <= set(cat.names())
    for e in cat:
        assert e.preset in preset_names() and e.normalization and e.kind
        for file in e.files or ():
            assert weights.check_file_path(file.path, e.name) == file.path
        if e.source.embedded:
            assert e.verified and all(x.sha256 and x.size is not None for x in e.files)
    for res in (256, 512, 1024):
        e = cat.get(f"svdrr-dit-fb-{res}")
        assert e.source.hf == f"xiechun-tsukuba/svdrr-dit-fb-{res}" and e.resolution == res
        assert (e.kind, e.preset, e.licence) == ("svdrr", "svdrr-lidc", "MIT")
        paths = {x.path for x in e.files}
        for part in ("transformer", "vae", "cc_projection"):
            assert {f"{part}/config.json", f"{part}/diffusion_pytorch_model.safetensors"} <= paths
        assert {"image_encoder/config.json", "image_encoder/model.safetensors", "scheduler/scheduler_config.json",
                "feature_extractor/preprocessor_config.json"} <= paths
        assert not e.verified and all(x.sha256 is None for x in e.files)  # trust on first use until pinned
    dvg = cat.get("dvg-diffusion")
    assert (dvg.kind, dvg.preset, dvg.files, dvg.source.hf) == ("dvg", "dvg-xraysyn", None, "xing0916/DVG-Diffusion")
    assert cat.get("xiechun-tsukuba/svdrr-dit-fb-512").name == "svdrr-dit-fb-512"  # the repo id also names it


@pytest.mark.parametrize("path", ["pipeline.py", "unet/diffusion_pytorch_model.bin", "model.pkl", "weights.pt",
                                  "model.ckpt", "../escape.json", "/etc/config.json", "a\\b.json",
                                  ".svdrr-weights.json", "sub/.hidden/x.json", "C:model.json"])
def test_code_pickles_and_odd_paths_are_refused(tmp_path, path):
    cat = write_catalogue(tmp_path, {"m": entry({"url": "http://127.0.0.1:9/"}, [f("config.json"), f(path)])})
    with pytest.raises(WeightsError, match="refusing file"):
        Catalogue.load(cat)
    with pytest.raises(WeightsError, match="refusing file"):
        weights.check_file_path(path)


@pytest.mark.parametrize("change, message", [
    ({"preset": "nope"}, "preset 'nope' is not a geometry preset"),
    ({"licence": None, "extra_key": 1}, "unknown key"),
    ({"source": {"hf": "a/b", "url": "http://x/"}}, "exactly one of"),
    ({"source": {"url": "file:///etc/"}}, "must be http"),
    ({"verified": True}, "needs sha256 and size"),
    ({"files": []}, "non-empty list"),
    ({"source": {"embedded": "models/demo"}}, "embedded model needs"),
    ({"source": {"embedded": "../models/demo"}, "verified": True, "files": [f("a.json", b"1")]}, "models/<name>"),
])
def test_catalogue_schema_errors_are_one_line(tmp_path, change, message):
    e = entry({"url": "http://127.0.0.1:9/"}, [f("config.json")])
    e.update(change)
    with pytest.raises(WeightsError, match=message) as info:
        Catalogue.load(write_catalogue(tmp_path, {"m": e}))
    assert "\n" not in str(info.value) and "'m'" in str(info.value)


# ------------------------------------------------------------------------------------------------- URL downloads
def url_catalogue(tmp_path, servers, files):
    return write_catalogue(tmp_path / "cat", {"tiny": entry({"url": servers.base + "/files/"}, files)})


def test_url_download_verifies_caches_and_is_not_repeated(tmp_path, servers):
    servers.files.update({"config.json": CONFIG, "unet/weights.safetensors": TENSORS})
    cat = url_catalogue(tmp_path, servers, [f("config.json", CONFIG), f("unet/weights.safetensors", TENSORS)])
    folder = weights.resolve("tiny", catalogue=cat, progress=False)
    assert folder == tmp_path / "home" / "models" / "tiny" / "url"
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "unet" / "weights.safetensors").read_bytes() == TENSORS
    record = json.loads((folder / weights.RECORD_NAME).read_text())
    assert record["files"]["unet/weights.safetensors"] == {"sha256": sha(TENSORS), "size": len(TENSORS),
                                                           "verified": True}
    assert len(servers.requests) == 2
    assert weights.resolve("tiny", catalogue=cat, progress=False) == folder
    assert len(servers.requests) == 2  # the second resolve never reached the server
    assert not list(folder.parent.glob(".partial-*"))
    report = weights.verify("tiny", catalogue=cat)
    assert report.ok and [c.status for c in report.checks] == ["ok", "ok"]
    assert weights.cache_status(Catalogue.load(cat).get("tiny")) == "cached"


def test_unknown_sha256_is_recorded_on_first_use_and_then_checked(tmp_path, servers, capsys):
    servers.files.update({"config.json": CONFIG, "weights.safetensors": TENSORS})
    cat = url_catalogue(tmp_path, servers, [f("config.json", CONFIG), f("weights.safetensors")])
    folder = weights.resolve("tiny", catalogue=cat, progress=True)
    err = capsys.readouterr().err
    assert "trust on first use" in err and "1 file(s) of 'tiny'" in err
    record = json.loads((folder / weights.RECORD_NAME).read_text())["files"]["weights.safetensors"]
    assert record == {"sha256": sha(TENSORS), "size": len(TENSORS), "verified": False}
    assert [c.status for c in weights.verify("tiny", catalogue=cat).checks] == ["ok", "recorded"]

    (folder / "weights.safetensors").write_bytes(TENSORS[::-1])  # same size, other bytes: only hashing sees it
    report = weights.verify("tiny", catalogue=cat)
    assert not report.ok and report.corrupt == ["weights.safetensors"]
    weights.resolve("tiny", catalogue=cat, progress=False, check=True)  # re-hashes and fetches the bad file again
    assert (folder / "weights.safetensors").read_bytes() == TENSORS and weights.verify("tiny", catalogue=cat).ok


def test_corrupt_download_is_refused_and_leaves_nothing(tmp_path, servers):
    bad = bytearray(TENSORS)
    bad[100] ^= 0xFF
    servers.files["weights.safetensors"] = bytes(bad)
    cat = url_catalogue(tmp_path, servers, [f("weights.safetensors", TENSORS)])
    with pytest.raises(WeightsError) as info:
        weights.resolve("tiny", catalogue=cat, progress=False)
    assert str(info.value).startswith(
        f"sha256 mismatch for weights.safetensors: expected {sha(TENSORS)} got {sha(bytes(bad))}")
    assert cached_files(tmp_path / "home") == []
    assert not weights.verify("tiny", catalogue=cat).ok


def test_size_mismatch_and_http_errors(tmp_path, servers):
    servers.files["config.json"] = CONFIG + b" "
    cat = url_catalogue(tmp_path, servers, [{"path": "config.json", "sha256": None, "size": len(CONFIG)}])
    with pytest.raises(WeightsError, match="size mismatch for config.json"):
        weights.resolve("tiny", catalogue=cat, progress=False)
    cat = url_catalogue(tmp_path, servers, [f("missing.json", CONFIG)])
    with pytest.raises(WeightsError, match="cannot download missing.json of 'tiny' from .*HTTP 404"):
        weights.resolve("tiny", catalogue=cat, progress=False)
    assert cached_files(tmp_path / "home") == []


def test_progress_callback_sees_every_byte(tmp_path, servers):
    servers.files["weights.safetensors"] = TENSORS
    cat = url_catalogue(tmp_path, servers, [f("weights.safetensors", TENSORS)])
    seen = []
    weights.resolve("tiny", catalogue=cat, progress=lambda name, done, total: seen.append((name, done, total)))
    assert seen and seen[-1] == ("weights.safetensors", len(TENSORS), len(TENSORS))


# ------------------------------------------------------------------------------------------- offline, local paths
@pytest.mark.parametrize("how", ["SVDRR_OFFLINE", "HF_HUB_OFFLINE", "argument"])
def test_offline_names_the_missing_files(tmp_path, servers, monkeypatch, how):
    servers.files.update({"config.json": CONFIG, "weights.safetensors": TENSORS})
    cat = url_catalogue(tmp_path, servers, [f("config.json", CONFIG), f("weights.safetensors", TENSORS)])
    if how != "argument":
        monkeypatch.setenv(how, "1")
    with pytest.raises(WeightsError) as info:
        weights.resolve("tiny", catalogue=cat, offline=True if how == "argument" else None, progress=False)
    msg = str(info.value)
    assert "offline" in msg and "config.json, weights.safetensors" in msg and "\n" not in msg
    assert servers.requests == []


def test_offline_uses_the_cache(tmp_path, servers, monkeypatch):
    servers.files.update({"config.json": CONFIG})
    cat = url_catalogue(tmp_path, servers, [f("config.json", CONFIG)])
    folder = weights.resolve("tiny", catalogue=cat, progress=False)
    n = len(servers.requests)
    monkeypatch.setenv("SVDRR_OFFLINE", "1")
    assert weights.resolve("tiny", catalogue=cat, progress=False) == folder
    (folder / "config.json").write_bytes(b"{}")  # another size than recorded
    with pytest.raises(WeightsError, match="unverified or damaged config.json"):
        weights.resolve("tiny", catalogue=cat)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="missing config.json"):
        weights.resolve("tiny", catalogue=cat)
    assert len(servers.requests) == n


def test_explicit_folder_wins_and_a_bad_path_is_one_line(tmp_path):
    folder = tmp_path / "my model"
    folder.mkdir()
    assert weights.resolve(folder) == folder
    assert weights.resolve(str(folder)) == folder
    with pytest.raises(WeightsError, match="no model folder at"):
        weights.resolve(str(tmp_path / "absent"))
    with pytest.raises(WeightsError, match="unknown model 'nope'"):
        weights.resolve("nope")


def test_model_without_file_list_asks_for_a_folder():
    with pytest.raises(WeightsError, match="no file list in the catalogue"):
        weights.resolve("dvg-diffusion", progress=False)


# --------------------------------------------------------------------------------------------- embedded models
def test_embedded_model_is_copied_and_verified(tmp_path):
    root = tmp_path / "Resources"
    demo = root / "models" / "demo"
    (demo / "unet").mkdir(parents=True)
    (demo / "config.json").write_bytes(CONFIG)
    (demo / "unet" / "weights.safetensors").write_bytes(TENSORS)
    cat = write_catalogue(root, {"demo": entry({"embedded": "models/demo"},
                                               [f("config.json", CONFIG), f("unet/weights.safetensors", TENSORS)])})
    folder = weights.resolve("demo", catalogue=cat, progress=False)
    assert folder == tmp_path / "home" / "models" / "demo" / "embedded"
    assert (folder / "unet" / "weights.safetensors").read_bytes() == TENSORS
    assert weights.verify("demo", catalogue=cat).ok

    (demo / "config.json").write_bytes(b"{}")  # an installation whose file no longer matches the catalogue
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="sha256 mismatch for config.json"):
        weights.resolve("demo", catalogue=cat, progress=False)
    assert not (folder / "config.json").exists()


# -------------------------------------------------------------------------------------------- Hugging Face hub
def hub_catalogue(tmp_path, servers, files, repo="acme/tiny-svdrr", revision="main"):
    servers.repos["acme/tiny-svdrr"] = {"model_index.json": CONFIG, "transformer/config.json": CONFIG,
                                        "transformer/diffusion_pytorch_model.safetensors": TENSORS}
    return write_catalogue(tmp_path / "cat", {"hubby": entry({"hf": repo, "revision": revision}, files)})


@pytest.fixture
def hub(servers, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_ENDPOINT", servers.base)
    return servers


def test_hub_download_through_huggingface_hub(tmp_path, hub, capsys):
    files = [f("model_index.json"), f("transformer/config.json", CONFIG),
             f("transformer/diffusion_pytorch_model.safetensors"),
             f("feature_extractor/preprocessor_config.json", optional=True)]
    cat = hub_catalogue(tmp_path, hub, files)
    folder = weights.resolve("hubby", catalogue=cat, progress=True)
    assert folder == tmp_path / "home" / "models" / "hubby" / "main"
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == TENSORS
    assert (folder / "model_index.json").read_bytes() == CONFIG
    assert not (folder / "feature_extractor").exists()
    record = json.loads((folder / weights.RECORD_NAME).read_text())
    assert record["commit"] == COMMIT and record["absent"] == ["feature_extractor/preprocessor_config.json"]
    assert record["files"]["transformer/diffusion_pytorch_model.safetensors"]["sha256"] == sha(TENSORS)
    assert f"commit {COMMIT}" in capsys.readouterr().err
    # every file came from the pinned commit, the big one through the CDN
    resolves = [p for _, p in hub.requests if "/resolve/" in p]
    assert resolves[0].endswith("/resolve/main/model_index.json")
    assert all(f"/resolve/{COMMIT}/" in p for p in resolves[1:])
    assert ("GET", f"/cdn/{sha(TENSORS)}") in hub.requests
    assert cached_files(tmp_path / "home") == sorted(
        f"models/hubby/main/{p}" for p in (weights.RECORD_NAME, "model_index.json", "transformer/config.json",
                                          "transformer/diffusion_pytorch_model.safetensors"))
    n = len(hub.requests)
    assert weights.resolve("hubby", catalogue=cat, progress=False) == folder
    assert len(hub.requests) == n
    assert [c.status for c in weights.verify("hubby", catalogue=cat).checks] == ["recorded", "ok", "recorded",
                                                                                 "absent"]
    # a file lost later comes again from the commit of the first download, not from wherever 'main' is now
    (folder / "model_index.json").unlink()
    assert weights.resolve("hubby", catalogue=cat, progress=False) == folder
    assert [p for _, p in hub.requests[n:]] == [f"/acme/tiny-svdrr/resolve/{COMMIT}/model_index.json"] * 2


def test_hub_corrupt_file_is_refused(tmp_path, hub):
    cat = hub_catalogue(tmp_path, hub, [f("transformer/config.json", CONFIG),
                                        f("transformer/diffusion_pytorch_model.safetensors", TENSORS[:-1] + b"x")])
    with pytest.raises(WeightsError, match="sha256 mismatch for transformer/diffusion_pytorch_model.safetensors"):
        weights.resolve("hubby", catalogue=cat, progress=False)
    assert cached_files(tmp_path / "home") == sorted(
        f"models/hubby/main/{p}" for p in (weights.RECORD_NAME, "transformer/config.json"))


@pytest.mark.parametrize("repo, revision, files, message", [
    ("acme/nothing", "main", [f("model_index.json")], "repository acme/nothing not found"),
    ("acme/tiny-svdrr", "v9", [f("model_index.json")], "revision 'v9' not found"),
    ("acme/tiny-svdrr", "main", [f("model_index.json"), f("scheduler/scheduler_config.json")],
     "scheduler/scheduler_config.json not found in acme/tiny-svdrr@main"),
])
def test_hub_errors_are_one_line(tmp_path, hub, repo, revision, files, message):
    cat = hub_catalogue(tmp_path, hub, files, repo=repo, revision=revision)
    with pytest.raises(WeightsError, match=message) as info:
        weights.resolve("hubby", catalogue=cat, progress=False)
    assert "\n" not in str(info.value)


def test_hub_unreachable_is_one_line(tmp_path, hub, monkeypatch):
    cat = hub_catalogue(tmp_path, hub, [f("model_index.json")])
    hub.close()
    with pytest.raises(WeightsError, match="cannot download model_index.json of 'hubby'") as info:
        weights.resolve("hubby", catalogue=cat, progress=False)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ command line
def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list(capsys):
    code, out, err = run(capsys, "models", "list")
    assert code == 0, err
    assert "svdrr-dit-fb-1024" in out and "dvg-diffusion" in out and "not cached" in out
    code, out, _ = run(capsys, "models", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["svdrr-dit-fb-256"]["source"] == "hf:xiechun-tsukuba/svdrr-dit-fb-256@main"
    assert rows["svdrr-dit-fb-256"]["resolution"] == 256  # a number, as in the catalogue


@pytest.mark.parametrize("argv, message", [
    (["models", "verify", "nope"], "unknown model 'nope'"),
    (["models", "download", "nope"], "unknown model 'nope'"),
    (["models", "verify", "svdrr-dit-fb-256"], "'svdrr-dit-fb-256' is not in the cache"),
    (["models", "download", "dvg-diffusion"], "no file list"),
    (["models", "create-random", "svdrr-dit-fb-256", "--config", "huge", "-o", "x"], "invalid choice"),
    (["models"], "required"),
])
def test_cli_errors_are_one_line_exit_2(capsys, monkeypatch, argv, message):
    monkeypatch.setenv("SVDRR_OFFLINE", "1")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("svdrr: error:"), err


def test_cli_download_and_verify(tmp_path, servers, capsys, monkeypatch):
    servers.files.update({"config.json": CONFIG, "weights.safetensors": TENSORS})
    cat = Catalogue.load(url_catalogue(tmp_path, servers, [f("config.json", CONFIG), f("weights.safetensors")]))
    monkeypatch.setattr(weights.Catalogue, "load", classmethod(lambda cls, path=None: cat))
    code, out, err = run(capsys, "models", "download", "tiny", "--quiet")
    assert code == 0, err
    folder = Path(out.strip())
    assert (folder / "weights.safetensors").read_bytes() == TENSORS
    code, out, err = run(capsys, "models", "verify", "tiny")
    assert code == 0 and "ok            config.json" in out and "recorded" in out and "all 2 files verified" in out
    (folder / "config.json").write_bytes(b"{}")
    code, out, err = run(capsys, "models", "verify", "tiny")
    assert code == 2 and "corrupt       config.json" in out and "1 of 2 files of 'tiny'" in err
    code, out, err = run(capsys, "models", "list")
    assert "tiny" in out and "partial (1/2 files)" in out


def test_cli_create_random_svdrr(tmp_path, capsys):
    pytest.importorskip("SVDRRLogic.models")
    out_dir = tmp_path / "random"
    code, _, err = run(capsys, "models", "create-random", "svdrr-dit-fb-256", "--config", "tiny", "-o", str(out_dir))
    assert code == 0, err
    assert "lacks catalogue file" not in err  # the random model has the layout of the authors' folders
    assert out_dir.is_dir() and any(out_dir.rglob("*.safetensors"))
    assert not any(p.suffix in (".py", ".bin", ".pkl") for p in out_dir.rglob("*"))


def test_hub_progress_callback(tmp_path, hub):
    cat = hub_catalogue(tmp_path, hub, [f("transformer/diffusion_pytorch_model.safetensors")])
    seen = []
    weights.resolve("hubby", catalogue=cat, progress=lambda name, done, total: seen.append((name, done, total)))
    assert seen[-1] == ("transformer/diffusion_pytorch_model.safetensors", len(TENSORS), len(TENSORS))


def test_shipped_svdrr_file_list_round_trips_a_random_model_through_the_hub(tmp_path, hub):
    """create-random writes the layout the catalogue lists; served by the fake hub under the shipped file list, it
    downloads and loads with the SV-DRR loader."""
    models = pytest.importorskip("SVDRRLogic.models")
    made = weights.create_random("svdrr-dit-fb-256", tmp_path / "made", config="tiny")
    shipped = Catalogue.load().get("svdrr-dit-fb-256")
    hub.repos["authors/svdrr"] = {x.path: (made / x.path).read_bytes() for x in shipped.files}
    files = [{"path": x.path, "sha256": None, "size": None, "optional": x.optional} for x in shipped.files]
    cat = write_catalogue(tmp_path / "cat", {"copy": entry({"hf": "authors/svdrr", "revision": "main"}, files)})
    folder = weights.resolve("copy", catalogue=cat, progress=False)
    assert weights.verify("copy", catalogue=cat).ok
    assert models.load_svdrr(folder) is not None
