"""Signal handling of the command line: stop a long run at the next safe point."""
import logging
import signal
import threading

logger = logging.getLogger(__name__)


class GracefulStop:
    """Turn SIGINT / SIGTERM into a stop request polled between iterations.

    Inside the ``with`` block the first SIGINT or SIGTERM sets a flag that
    :meth:`should_stop` returns (pass it as ``reconstruct(..., should_stop=stop.should_stop)``),
    so the run ends after the iteration in progress, with every finished iteration
    checkpointed. A second signal raises :class:`KeyboardInterrupt` as soon as Python
    runs again (a numba kernel in progress finishes first); the checkpoint on disk still
    holds the last finished iteration. The previous handlers are restored on exit.

    Handlers can only be installed from the main thread; elsewhere the block runs
    without them (logged) and :meth:`should_stop` stays false.

    Parameters
    ----------
    signals : tuple of signal numbers
        Default ``(SIGINT, SIGTERM)``.

    Attributes
    ----------
    signum : int or None
        The first signal received.
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            logger.warning("%s received: stopping after the iteration in progress (its checkpoint keeps every "
                           "finished iteration); send it again to stop at once", signal.Signals(signum).name)
            return
        raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping at once")

    def should_stop(self):
        """True once a signal was received."""
        return self.signum is not None

    __call__ = should_stop

    @property
    def signal_name(self):
        """Name of the first signal received (``'SIGTERM'``), or None."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: SIGINT and SIGTERM keep their usual handlers")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, signal.SIG_DFL if prev is None else prev)
        self._previous.clear()
        return False
