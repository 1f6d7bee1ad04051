"""Solver backends, one per module, looked up by name and probed without importing them."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

from ..errors import BackendUnavailableError, UnknownBackendError
from .base import Backend, SolveRequest

#: name -> (module, class name, modules it needs)
REGISTRY: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "flow": ("alignment_solver.backends.flow", "FlowBackend", ("ortools",)),
    "cpsat": ("alignment_solver.backends.cpsat", "CpSatBackend", ("ortools",)),
    "pulp_cbc": ("alignment_solver.backends.pulp_cbc", "PulpCbcBackend", ("pulp",)),
    "pulp_highs": ("alignment_solver.backends.pulp_highs", "PulpHighsBackend", ("pulp", "highspy")),
    "greedy": ("alignment_solver.backends.greedy", "GreedyBackend", ()),
}


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Names of the registered backends whose packages are installed."""
    return [name for name, (_, _, needs) in REGISTRY.items() if all(_present(m) for m in needs)]


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``; errors list the valid and the available names."""
    valid = ["auto", *REGISTRY]
    if not isinstance(name, str) or name not in REGISTRY:
        raise UnknownBackendError(f"backend must be one of {valid}; got {name!r}")
    module, cls, needs = REGISTRY[name]
    missing: Optional[str] = next((m for m in needs if not _present(m)), None)
    if missing is not None:
        extra = "pulp" if name.startswith("pulp") else "core"
        raise BackendUnavailableError(
            f"backend {name!r} needs the package {missing!r}, which is not installed "
            f"(pip install 'alignment-solver[{extra}]'); available backends: {available_backends()}")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Backend", "SolveRequest", "REGISTRY", "available_backends", "get_backend"]
