"""SIGTERM inside a run: :class:`Terminated`, held back while an MLflow call of :mod:`dpcam.tracking` works.

Inside a run SIGTERM raises :class:`Terminated` (a ``BaseException``, so no library's
``except Exception`` swallows it). While an MLflow call of dpcam.tracking is in progress (a model
being logged, a metric being written) the signal is only recorded and raised when the call
returns: MLflow catches broad exceptions in places (signature inference runs the model inside
``except Exception``), and a store write cut in half helps nobody. Either way the run ends KILLED.
"""

from __future__ import annotations

import contextlib
import functools
import signal
from collections.abc import Iterator
from typing import Any

from dpcam.errors import UserError
from dpcam.tracking.store import store_fault


class Terminated(BaseException):
    """Raised inside a run when the process receives SIGTERM (the CLI exits 143 with one line).

    A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` blocks (MLflow has broad
    ones) let it through.
    """

    exit_code = 143

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = int(signum)
        super().__init__(f"terminated by signal {self.signum} ({signal.Signals(self.signum).name})")


# the last SIGTERM received inside a run and not yet seen out of it: raised at once outside MLflow
# calls, when the call returns inside one, and again at the run's end if code in between dropped it
_signals: dict[str, Any] = {"busy": 0, "pending": None}


def _on_term(signum, frame) -> None:
    _signals["pending"] = signum
    if not _signals["busy"]:
        raise Terminated(signum)


def _raise_pending() -> None:
    signum = _signals["pending"]
    if signum is not None and not _signals["busy"]:
        _signals["pending"] = None
        raise Terminated(signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold a SIGTERM back while MLflow works; raise it (Terminated) once the block has returned."""
    _signals["busy"] += 1
    try:
        yield
    finally:
        _signals["busy"] -= 1
    _raise_pending()


def _shielded(fn):
    """Run ``fn`` (an MLflow call) with SIGTERM deferred to its return; a store fault is one line (UserError)."""
    doing = fn.__name__.strip("_").replace("_", " ")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _signals_deferred():
            try:
                return fn(*args, **kwargs)
            except UserError:
                raise
            except Exception as e:
                if (err := store_fault(e, doing)) is None:
                    raise
                raise err from None

    return wrapper
