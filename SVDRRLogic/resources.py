"""Where the extension's data files live: the top-level ``Resources/`` folder beside the package.

The same relative layout holds in a source checkout, an editable install and an installed Slicer module, so one
lookup serves all three; ``SVDRR_RESOURCES`` overrides it for unusual deployments.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path


def resources_dir() -> Path:
    override = os.environ.get("SVDRR_RESOURCES")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "Resources"


@lru_cache(maxsize=None)
def load_json(*parts: str) -> dict:
    """Read a JSON resource once; a missing or broken file (an incomplete install, a hand edit, ``SVDRR_RESOURCES``
    pointing elsewhere) is an OSError or ValueError naming its full path."""
    path = resources_dir().joinpath(*parts)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise OSError(f"SVDRR's resource file {path} cannot be read ({exc.strerror or exc}); the installation is "
                      "incomplete, or SVDRR_RESOURCES points to the wrong folder") from None
    except ValueError as exc:
        raise ValueError(f"SVDRR's resource file {path} is not valid JSON ({exc})") from None
