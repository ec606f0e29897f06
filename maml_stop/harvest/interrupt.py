"""Ctrl-C during a harvest stops it cleanly after the shard in progress (issue 29): the first SIGINT
sets a flag that the harvest loop reads between shards, so the shard being generated is still written
and the run ends with its summary; a second SIGINT interrupts at once (KeyboardInterrupt), losing only
the shard in progress, which a resumed harvest generates again.

>>> stop = StopRequest.on_sigint()                  # doctest: +SKIP
>>> try:
...     while work and not stop.requested: ...
... finally:
...     stop.restore()
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopRequest:
    """Whether a stop was requested (``requested``, read between shards)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    @classmethod
    def on_sigint(cls) -> "StopRequest":
        """A request that SIGINT sets, until :meth:`restore` (main thread only: elsewhere signals cannot
        be handled, and the request never comes)."""
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            stop._previous = signal.signal(signal.SIGINT, stop._handle)
            stop._installed = True
        return stop

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: stopping after the shard in progress (press Ctrl-C again to stop at once)")

    def restore(self) -> None:
        """Put back the SIGINT handler that was there before."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
