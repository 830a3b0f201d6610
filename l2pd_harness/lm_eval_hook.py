"""Registers the ``l2pd`` model with lm-eval's registry, lazily, so the stock ``lm_eval`` CLI finds it.

lm-eval 0.4.13 imports no third-party code before it resolves ``--model``. The package installs
``l2pd_harness_lm_eval.pth``, which calls :func:`install` at interpreter start: it only adds an import watcher,
and the watcher acts once, right after ``lm_eval.api.registry`` is first imported, by registering ``l2pd`` as a
lazy ``module:Class`` target (nothing of torch or of this package's model code is imported until lm-eval asks for
``l2pd``). Programs that never import lm-eval are not affected.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

REGISTRY = "lm_eval.api.registry"
TARGET = "l2pd_harness.lm_eval_model:L2PDLM"


def register(registry: ModuleType) -> None:
    """Add ``l2pd`` to lm-eval's model registry (after its own models, which it loads only into an empty one)."""
    import lm_eval.models  # noqa: F401  (registers the built-in models first)

    if "l2pd" not in registry.model_registry:
        registry.model_registry.register("l2pd", target=TARGET)


class _RegisterAfterExec(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register(module)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Watch for lm-eval's registry (once per interpreter); register at once if it is already imported."""
    if REGISTRY in sys.modules:
        register(sys.modules[REGISTRY])
    elif not any(isinstance(finder, _RegistryWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())


def lm_eval_main() -> None:
    """``l2pd-eval``: lm-eval's own CLI with ``l2pd`` registered (for environments without the startup hook)."""
    install()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
