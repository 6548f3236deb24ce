"""Shared entry-point plumbing: library errors become one-line messages and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from prunenet.errors import PruneNetError


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; a :class:`PruneNetError` (or Lightning's MisconfigurationException, e.g.
    more devices than the machine has) prints ``error: <message>`` and exits 2.

    Set ``PRUNENET_VERBOSE=1`` to get the traceback instead.
    """
    try:
        main()
    except Exception as exc:
        if not is_user_error(exc) or os.environ.get("PRUNENET_VERBOSE"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def is_user_error(exc: BaseException) -> bool:
    """A :class:`PruneNetError`, or Lightning's MisconfigurationException.

    Only a program that has imported Lightning can raise the latter, so Lightning is not imported
    here: that alone would add seconds to every ``compress`` / ``evaluate`` / ``generate`` start.
    """
    if isinstance(exc, PruneNetError):
        return True
    lightning_exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    return lightning_exceptions is not None and isinstance(exc, lightning_exceptions.MisconfigurationException)
