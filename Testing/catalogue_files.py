"""Helper for tests that need a model catalogue with an embedded model, as Resources/models.json has them."""
import shutil
from pathlib import Path

from SVDRRLogic import weights


def embedded_entry(root: Path, model: Path, name: str, **fields) -> dict:
    """Copy ``model`` to ``root/models/name`` and return its catalogue entry (files with sha256 and size, source
    embedded, verified) with ``fields`` (kind, preset, ...) added."""
    target = root / "models" / name
    shutil.copytree(model, target)
    files = []
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        digest, size = weights.sha256_of(path)
        files.append({"path": path.relative_to(target).as_posix(), "sha256": digest, "size": size})
    return {"source": {"embedded": f"models/{name}"}, "verified": True, "files": files, "licence": "MIT", **fields}
