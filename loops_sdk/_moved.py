"""Old module paths of moved modules, kept importable for one release.

``import loops_sdk.transport`` (or ``from loops_sdk import transport``) gives the module at its
new path, :mod:`loops_sdk.sync.transport`, with a ``DeprecationWarning``. A finder rather than
a stub file at each old path, so the moved files are plain renames in version control.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# old module -> new module (both relative to loops_sdk)
MOVED = {
    "transport": "sync.transport",
    "spool": "sync.spool",
    "service": "serve.service",
    "serve_pool": "serve.pool",
    "unary_loop": "serve.unary_loop",
    "demo": "cli.demo",
    "report": "learner.report.report",
    "charts": "learner.report.charts",
}


def warn(message: str) -> None:
    """A DeprecationWarning attributed to the code doing the import (not to the import
    machinery or the alias), so Python's default filters show it to that code's author."""
    frame, level = sys._getframe(1), 2
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            frame = frame.f_back        # warnings.warn skips these itself: do not count them
            continue
        if name != __file__ and frame.f_globals.get("__name__", "") not in _ALIAS_FILES:
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


# Alias modules that are files (they re-export rather than move): skipped like this one.
_ALIAS_FILES = frozenset({"loops_sdk.batch", "loops_sdk.security"})


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self._new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None   # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module: ModuleType) -> None:
        warn(f"{module.__name__} is deprecated and will be removed in the next release; "
             f"import {self._new}")
        # The alias *is* the new module, so every name (and monkeypatching) keeps working.
        sys.modules[module.__name__] = importlib.import_module(self._new)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str) -> None:
        self._prefix = package + "."
        self._package = package

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self._prefix):
            return None
        new = MOVED.get(fullname[len(self._prefix):])
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"{self._package}.{new}"))


def install(package: str) -> None:
    """Make the old paths under ``package`` importable (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder(package))
