"""Exceptions raised by alignment-solver.

Every exception the package raises on purpose derives from :class:`AlignmentError`, and also
from the builtin class a caller would naturally catch::

    AlignmentError
    ├── UnknownBackendError (ValueError)       backend name not registered; lists valid names
    ├── BackendUnavailableError (ImportError)  backend registered but its package is missing
    ├── UnsupportedProblemError (ValueError)   backend cannot express this problem
    ├── InvalidOptionError (ValueError)        bad solve() option; names it and the allowed values
    ├── NoSolutionError (RuntimeError)         reading the solution of a result that has none
    ├── ReportError (ValueError)               round reports that do not fit the plan; nothing changed
    ├── RoundError (ValueError)                rounds out of order (plan/observe); nothing changed
    ├── StateError (ValueError)                a state file that is corrupt, for other experts, or locked
    ├── ReplyError (ValueError)                one framework reply that fails validation (it is rejected)
    └── TrainingFailedError (RuntimeError)     no valid training reply for max_failed_rounds rounds in a row

Validation of :class:`~alignment_solver.AlignmentProblem` goes through pydantic, so bad problem
data surfaces as :class:`pydantic.ValidationError` (also a ``ValueError``) whose text names the
field, the rule and the value received.  Infeasibility and time limits are *statuses* on the
result, never exceptions.
"""

from __future__ import annotations

import os
from pathlib import Path


class AlignmentError(Exception):
    """Base class of every error raised on purpose by alignment-solver."""


class UnknownBackendError(AlignmentError, ValueError):
    """The backend name is not registered; the message lists the valid names."""


class BackendUnavailableError(AlignmentError, ImportError):
    """The backend is registered but the package it needs is not installed."""


class UnsupportedProblemError(AlignmentError, ValueError):
    """The backend cannot express this problem (e.g. ``flow`` with budget rows)."""


class InvalidOptionError(AlignmentError, ValueError):
    """An option of :func:`~alignment_solver.solve` is out of range or unknown."""


class NoSolutionError(AlignmentError, RuntimeError):
    """The result has no assignment (infeasible, or nothing found in time)."""


class ReportError(AlignmentError, ValueError):
    """Reports that do not fit the round's plan; nothing was changed."""


class RoundError(AlignmentError, ValueError):
    """A round planned or observed out of order (rounds strictly increase); nothing was changed."""


class StateError(AlignmentError, ValueError):
    """A state file that cannot be restored (corrupt, for another number of experts, or locked)."""


class ReplyError(AlignmentError, ValueError):
    """One client's reply failed validation; the message says which field and why."""


class TrainingFailedError(AlignmentError, RuntimeError):
    """No valid training reply for ``max_failed_rounds`` consecutive rounds (Flower strategy,
    NVFlare workflow); the message names the most frequent reason the clients gave."""


def read_text(path: "str | os.PathLike", what: str, error: type[Exception] = ValueError) -> str:
    """The text of the ``what`` file at ``path``; ``error`` says, in one line, why it cannot be read."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} file {path} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} file {path}: {exc}") from None


def describe(value: object, limit: int = 80) -> str:
    """Short printable form of a received value, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
