"""Logging: every module logs to ``logging.getLogger(__name__)`` under the ``incseg`` logger; the
command line sends its INFO records to standard output from rank 0 only (:func:`configure`).

Used as a library, incseg prints nothing unless the application configures the ``incseg`` logger.
Command results (tables, listings) are the commands' output, printed by the CLI itself.
"""

from __future__ import annotations

import logging
import sys


class _Stdout(logging.Handler):
    """Writes to the *current* ``sys.stdout`` (so that redirections and captures see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except (OSError, ValueError):  # a closed or broken stream must never stop a run
            self.handleError(record)


def configure(rank: int = 0) -> None:
    """Messages only, at INFO, on standard output; processes other than rank 0 stay silent."""
    logger = logging.getLogger("incseg")
    for handler in [h for h in logger.handlers if isinstance(h, _Stdout)]:
        logger.removeHandler(handler)
    handler = _Stdout()
    handler.addFilter(lambda _record: rank == 0)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
