"""Which Python packages SVDRR still needs inside Slicer, decided from package metadata alone.

Standard library only (plus ``packaging`` when importable, which Slicer ships), no Qt and no SVDRRLogic: it must
work before torch and the engine's dependencies exist, and it is tested with plain pytest. Versions come from
``importlib.metadata``, so nothing is imported (a half-installed torch is never loaded just to read its version).

Packages that Slicer itself ships (numpy, scipy, SimpleITK, pydicom, Pillow) are never reinstalled from here:
replacing them can break Slicer's own modules (pydicom 3 and the DICOM module, for instance), so an old or missing
one only produces a warning.
"""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

SLICER_BUNDLED = frozenset({"numpy", "scipy", "simpleitk", "pydicom", "pillow"})
TORCH_REQUIREMENT = ">=2.1"  # keep in step with pyproject.toml

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[A-Za-z0-9,._ -]*\])?\s*(.*)$")
_SPECIFIER = re.compile(r"^(===|==|!=|<=|>=|~=|<|>)\s*([A-Za-z0-9.*+!_-]+)$")


def normalize(name: str) -> str:
    """PEP 503 name: case and runs of - _ . do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file, without comments, blank lines or pip options."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def parse(requirement: str) -> tuple[str, list[tuple[str, str]]]:
    """``"name[extra]>=1.2,<3"`` -> ``("name", [(">=", "1.2"), ("<", "3")])``; markers (``; ...``) are ignored."""
    text = requirement.split(";", 1)[0].strip()
    match = _REQUIREMENT.match(text)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    name, _, rest = match.groups()
    specifiers = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        spec = _SPECIFIER.match(part)
        if not spec:
            raise ValueError(f"unsupported version specifier {part!r} in {requirement!r}")
        specifiers.append((spec.group(1), spec.group(2)))
    return name, specifiers


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfies(version: str, specifiers: list[tuple[str, str]]) -> bool:
    """Whether ``version`` meets every specifier (``packaging`` semantics when available)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return all(_compare(version, op, wanted) for op, wanted in specifiers)
    try:
        return Version(version) in SpecifierSet(",".join(op + wanted for op, wanted in specifiers),
                                                prereleases=True)
    except InvalidVersion:
        return False


def is_met(requirement: str) -> bool:
    name, specifiers = parse(requirement)
    version = installed_version(name)
    return version is not None and satisfies(version, specifiers)


def plan(requirements: list[str]) -> tuple[list[str], list[str]]:
    """``(to_install, warnings)``: unmet requirements to pip-install, and notes about Slicer's own packages."""
    to_install, warnings = [], []
    for requirement in requirements:
        if is_met(requirement):
            continue
        name, _ = parse(requirement)
        version = installed_version(name)
        if normalize(name) in SLICER_BUNDLED:
            found = f"version {version}" if version else "it is missing"
            warnings.append(f"SVDRR expects {requirement}, but Slicer ships {name} and {found}; "
                            f"SVDRR does not replace Slicer's own packages")
        else:
            to_install.append(requirement)
    return to_install, warnings


def torch_is_met(requirement: str = TORCH_REQUIREMENT) -> bool:
    return is_met("torch" + requirement)


def _compare(version: str, op: str, wanted: str) -> bool:
    """Fallback comparison on release numbers (1.10 > 1.9), for Pythons without ``packaging``."""
    if op in ("==", "!=") and wanted.endswith(".*"):
        prefix = _release(wanted[:-2])
        equal = _release(version)[:len(prefix)] == prefix
        return equal if op == "==" else not equal
    a, b = _release(version), _release(wanted)
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    if op == "~=":
        return a >= b and a[:len(_release(wanted)) - 1] == b[:len(_release(wanted)) - 1]
    return {"==": a == b, "===": version == wanted, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b,
            "<": a < b}[op]


def _release(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        numbers.append(int(digits.group()))
        if digits.group() != part:  # e.g. "0rc1": stop at the pre-release tag
            break
    return tuple(numbers)
