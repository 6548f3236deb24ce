"""Shared entry-point plumbing: library errors become one-line messages and exit code 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

from prunenet.errors import PruneNetError


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; a :class:`PruneNetError` (or Lightning's MisconfigurationException, e.g.
    more devices than the machine has) prints ``error: <message>`` and exits 2.

    Set ``PRUNENET_VERBOSE=1`` to get the traceback instead.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        main()
    except (PruneNetError, MisconfigurationException) as exc:
        if os.environ.get("PRUNENET_VERBOSE"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
