"""Named recipes: YAML files of config keys shipped inside the package."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from vggkit.errors import unknown_name


def _files() -> dict[str, Any]:
    root = resources.files(__name__)
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description (the YAML's leading comment)."""
    out = {}
    for name, path in sorted(_files().items()):
        text = path.read_text()
        first = text.splitlines()[0] if text else ""
        out[name] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return out


def load_recipe(name: str) -> dict[str, Any]:
    files = _files()
    if name not in files:
        raise unknown_name("recipe", name, files)
    data = yaml.safe_load(files[name].read_text()) or {}
    return {str(k).replace("-", "_"): v for k, v in data.items()}
