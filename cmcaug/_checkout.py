"""How a source checkout's top-level folders become cmcaug's subpackages, and nothing else.

setuptools installs `kernels/`, `cli/` and `benchmarks/` as `cmcaug.kernels`, `cmcaug.cli` and
`cmcaug.benchmarks` (its `package-dir` mapping). A checkout can get this wrong in two ways:

- An interpreter whose `sys.path` holds the checkout root (`python -m ...`, `python -c`, a REPL or
  notebook opened there) finds those folders by their own names first and hides any installed distribution
  of the same name: transformers imports Hugging Face's `kernels`. Each folder's `__init__.py` therefore
  checks the name it was imported under and, when it is not its `cmcaug.*` name, calls `give_back`.
- `cmcaug` found in this checkout (the working directory) while `cmcaug.kernels`, or any module this
  checkout lacks, comes from the editable install of another clone: two source trees, silently mixed.
  `import cmcaug` from a checkout puts a `CheckoutFinder` first on `sys.meta_path`: it finds the three
  subpackages beside the `cmcaug/` that was imported, and every other `cmcaug.*` module in this checkout
  only, before setuptools' editable finder is asked.

An installed copy (a wheel) needs neither: there the subpackages are folders inside `cmcaug/`.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

SUBPACKAGES = ("kernels", "cli", "benchmarks")


def checkout_root(package_dir: str | os.PathLike[str]) -> Path | None:
    """The source checkout that holds the package folder `package_dir` (cmcaug/), or None for an installed copy."""
    root = Path(package_dir).resolve().parent
    markers = [root / "pyproject.toml", *(root / name / "__init__.py" for name in SUBPACKAGES)]
    return root if all(marker.is_file() for marker in markers) else None


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds every `cmcaug.*` module in the checkout `root`, and nowhere else: `kernels`, `cli` and
    `benchmarks` in the folders of those names, the rest in their parent package's folders."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.partition(".")
        if package != "cmcaug" or not name:
            return None
        if name in SUBPACKAGES:
            folder = self.root / name
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:  # not in this checkout: never let a later finder take it from another tree
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return spec


def find_subpackages_beside(package_dir: str | os.PathLike[str]) -> None:
    """In a checkout, let `cmcaug.kernels` / `.cli` / `.benchmarks` come from the same tree as `cmcaug`."""
    root = checkout_root(package_dir)
    if root is None or any(isinstance(finder, CheckoutFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, CheckoutFinder(root))


def give_back(name: str, init_file: str) -> None:
    """Called by a checkout folder imported under its bare name `name` (the checkout root on `sys.path`):
    load the installed distribution of that name in its place, or fail as if the folder were not there."""
    folder = os.path.realpath(os.path.dirname(init_file))
    root = os.path.dirname(folder)
    hint = f"this checkout's {os.path.basename(folder)}/ folder is the package cmcaug.{os.path.basename(folder)}"
    if "." in name:
        raise ImportError(f"{name} is not importable by that name: {hint}; import it by that name", name=name)
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r} ({hint})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement that ran this folder returns sys.modules[name]
    spec.loader.exec_module(module)
