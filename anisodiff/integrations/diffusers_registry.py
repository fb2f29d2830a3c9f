"""Make ``diffusers.DiffusionPipeline.from_pretrained(saved_dir)`` find the anisodiff pipelines.

Why this mechanism. diffusers (0.42) resolves a saved pipeline in two places
(``diffusers/pipelines/pipeline_loading_utils.py``):

* the pipeline class: ``model_index.json``'s ``_class_name`` is looked up as an attribute of the
  ``diffusers`` module (``_get_pipeline_class``);
* each component ``[library, class]``: a library that is not one diffusers loads from itself
  (diffusers, transformers, ...) is taken from ``sys.modules`` only (``_get_library_or_raise``).
  diffusers deliberately never imports a module because a repository names it: that would run the
  repository's choice of code. The one way to load code named by the files is a custom pipeline,
  which needs ``trust_remote_code=True``.

So nothing anisodiff could write into ``model_index.json`` or ``scheduler_config.json`` makes a
process that has never imported anisodiff load its classes, and the files stay what
``save_pretrained`` writes (``_class_name: "AnisoDDPMPipeline"``, the scheduler as
``["anisodiff.integrations.diffusers", "AnisoDDPMScheduler"]``, the spec as JSON in the scheduler
config). What makes them load is anisodiff's code in the process: importing
:mod:`anisodiff.integrations.diffusers` sets the pipeline and scheduler classes as attributes of the
``diffusers`` module (and puts itself in ``sys.modules``). ``import anisodiff`` calls
:func:`install`, which imports it right away when diffusers is already imported, and otherwise
waits for diffusers: a finder on ``sys.meta_path`` that only answers for the top-level name
``diffusers`` and, once diffusers' own ``__init__`` has run, imports the integration and removes
itself. anisodiff itself never imports diffusers (``import anisodiff`` stays fast and works
without it). A failure to register warns; it never breaks ``import diffusers``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings

__all__ = ["install", "INTEGRATION"]

INTEGRATION = "anisodiff.integrations.diffusers"
_lock = threading.Lock()


def _import_integration() -> None:
    try:
        importlib.import_module(INTEGRATION)
    except Exception as exc:  # an incompatible diffusers must not break the user's import of it
        warnings.warn(f"anisodiff could not register its pipelines with diffusers ({type(exc).__name__}: "
                      f"{exc}); DiffusionPipeline.from_pretrained will not find them. Import "
                      f"{INTEGRATION} to see the full error.", RuntimeWarning, stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps diffusers' own loader: runs it, then imports the integration."""

    def __init__(self, loader, finder: "_WaitForDiffusers"):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader  # the module keeps its real loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.remove()
        _import_integration()

    def __getattr__(self, name):  # resource readers etc.: the real loader's
        return getattr(self._loader, name)


class _WaitForDiffusers(importlib.abc.MetaPathFinder):
    """Answers only for ``diffusers``: finds it with the other finders and wraps its loader.
    It stays installed until diffusers actually executes (``importlib.util.find_spec("diffusers")``
    alone imports nothing)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "diffusers":
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # a namespace package or a legacy loader: leave it alone
        spec.loader = _RegisterAfterExec(spec.loader, self)
        return spec

    def remove(self) -> None:
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)


def installed() -> bool:
    """Whether :func:`install` is still waiting for diffusers to be imported."""
    return any(isinstance(f, _WaitForDiffusers) for f in sys.meta_path)


def install() -> None:
    """Register the anisodiff pipelines with diffusers now (diffusers already imported) or as soon as
    it is imported. Idempotent; never imports diffusers itself."""
    module = sys.modules.get("diffusers", False)
    if module is None:  # import blocked on purpose (sys.modules["diffusers"] = None)
        return
    if module is not False:
        if INTEGRATION not in sys.modules:
            _import_integration()
        return
    with _lock:
        if not installed():
            sys.meta_path.insert(0, _WaitForDiffusers())
