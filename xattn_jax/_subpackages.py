"""The repository's other top-level folders, importable only as subpackages of `xattn_jax`.

| folder            | import as                  | layer                                              |
|-------------------|----------------------------|----------------------------------------------------|
| `xattn_jax/`      | `xattn_jax`                | core: SPEC, layouts, selection, XLA reference, ops |
| `pallas_kernels/` | `xattn_jax.pallas_kernels` | the Pallas backends (they import the core)         |
| `models/`         | `xattn_jax.models`         | the Flax NNX transformer (imports the ops)         |
| `evaluation/`     | `xattn_jax.evaluation`     | haystacks, task accuracy, threshold calibration    |
| `cli/`            | `xattn_jax.cli`            | the `xattn-jax` command                            |

Names under `xattn_jax` cannot be shadowed by a user's `models.py` or `pallas_kernels.py`. An installed package
gets the mapping from setuptools' package-dir (pyproject.toml); a checkout on sys.path (PYTHONPATH=<repo>) gets it
from `_CheckoutFinder`, which serves only these four names and only when no installed mapping did.

The old top-level names `models` and `pallas_kernels` (and `models.haystack`, `models.calibration`) still import,
with a DeprecationWarning, as aliases of the same module objects (`deprecated_alias`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import pathlib
import sys
import warnings

SUBPACKAGES = {
  "xattn_jax.pallas_kernels": "pallas_kernels",
  "xattn_jax.models": "models",
  "xattn_jax.evaluation": "evaluation",
  "xattn_jax.cli": "cli",
}
# Old name -> new name; submodules of an old package map to the same submodule of the new one unless listed.
DEPRECATED = {
  "models": "xattn_jax.models",
  "pallas_kernels": "xattn_jax.pallas_kernels",
  "models.haystack": "xattn_jax.evaluation.haystack",
  "models.calibration": "xattn_jax.evaluation.calibration",
}
_ROOT = pathlib.Path(__file__).resolve().parent.parent


class _CheckoutFinder(importlib.abc.MetaPathFinder):
  """`xattn_jax.<sub>` from the repository's `<folder>/` when xattn_jax itself is imported from a checkout."""

  def find_spec(self, fullname, path=None, target=None):
    folder = SUBPACKAGES.get(fullname)
    if folder is None or not (_ROOT / folder / "__init__.py").is_file():
      return None
    return importlib.util.spec_from_file_location(
      fullname, _ROOT / folder / "__init__.py", submodule_search_locations=[str(_ROOT / folder)]
    )


class _AliasLoader(importlib.abc.Loader):
  def __init__(self, target: str):
    self.target = target

  def create_module(self, spec):
    self.module = importlib.import_module(self.target)
    self.spec = self.module.__spec__
    return self.module

  def exec_module(self, module):
    module.__spec__ = self.spec  # the import system set the alias's spec on the shared module; restore its own


class _DeprecatedFinder(importlib.abc.MetaPathFinder):
  """`models.<x>` / `pallas_kernels.<x>` as the `xattn_jax` module, once the old package itself is our alias (a
  user's own `models` package is left alone)."""

  def find_spec(self, fullname, path=None, target=None):
    parent, _, leaf = fullname.partition(".")
    if not leaf or parent not in DEPRECATED or sys.modules.get(parent) is not sys.modules.get(DEPRECATED[parent]):
      return None
    new = DEPRECATED.get(fullname, f"{DEPRECATED[parent]}.{leaf}")
    return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), is_package=False)


def install() -> None:
  if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutFinder())  # last: an installed mapping wins
    sys.meta_path.insert(0, _DeprecatedFinder())


def moved_attribute(package: str, name: str):
  """For an old package's module `__getattr__`: its submodule `name` where it moved (`DEPRECATED`), with a warning;
  `from models import haystack` asks the package for the attribute before any finder sees `models.haystack`."""
  new = DEPRECATED.get(f"{package}.{name}")
  if new is None:
    raise AttributeError(f"module {DEPRECATED[package]!r} has no attribute {name!r}")
  warnings.warn(f"`{package}.{name}` moved to `{new}`", DeprecationWarning, stacklevel=3)
  return importlib.import_module(new)


def deprecated_alias(name: str) -> None:
  """Called first thing by the `models` and `pallas_kernels` packages: under the old top-level name, warn and make
  the name an alias of the `xattn_jax` package (which this import runs under its own name first)."""
  if name not in DEPRECATED:
    return
  new = DEPRECATED[name]
  warnings.warn(
    f"`import {name}` is deprecated and will be removed; use `import {new}`", DeprecationWarning, stacklevel=3
  )
  sys.modules[name] = importlib.import_module(new)
