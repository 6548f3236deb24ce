"""Shared entry-point plumbing: library errors become one-line messages and exit code 2."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from prunenet.errors import PruneNetError, PruneNetWarning


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; a :class:`PruneNetError` (or Lightning's MisconfigurationException, e.g.
    more devices than the machine has) prints ``error: <message>`` and exits 2. A
    :class:`PruneNetWarning` prints ``warning: <message>`` and the work goes on.

    Set ``PRUNENET_VERBOSE=1`` to get the traceback instead.
    """
    warnings.showwarning = _show_warning
    try:
        main()
    except Exception as exc:
        if not report_user_error(exc):
            raise
        sys.exit(2)


def report_user_error(exc: BaseException) -> bool:
    """Print ``error: <message>`` to stderr if ``exc`` is a user error (:func:`is_user_error`) and
    ``PRUNENET_VERBOSE`` does not ask for the traceback; returns whether it printed."""
    if not isinstance(exc, Exception) or not is_user_error(exc) or os.environ.get("PRUNENET_VERBOSE"):
        return False
    print(f"error: {exc}", file=sys.stderr)
    return True


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A :class:`PruneNetWarning` is one ``warning: <message>`` line; other warnings as Python shows them."""
    if issubclass(category, PruneNetWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def is_user_error(exc: BaseException) -> bool:
    """A :class:`PruneNetError`, or Lightning's MisconfigurationException.

    Only a program that has imported Lightning can raise the latter, so Lightning is not imported
    here: that alone would add seconds to every ``compress`` / ``evaluate`` / ``generate`` start.
    """
    if isinstance(exc, PruneNetError):
        return True
    lightning_exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    return lightning_exceptions is not None and isinstance(exc, lightning_exceptions.MisconfigurationException)
