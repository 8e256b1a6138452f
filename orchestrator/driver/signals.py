"""SIGTERM as Ctrl-C in the driver: `kill`, `ray job stop` or a pod's end then end the runs, the
parent run and the local Ray the way an interrupt does."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def terminated_on_sigterm() -> Iterator[None]:
    """SIGTERM (`kill`, `ray job stop`, a pod's end) raises KeyboardInterrupt in the driver, as
    Ctrl-C does, so that its runs and parent are ended and its local Ray shut down, rather than
    the process vanishing with them left behind. `ray.init` puts its own handler in (one that
    aborts the process), so `interrupt_on_sigterm` is called again once Ray is up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def interrupt_on_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    log.warning(
        "received %s: ending the runs, the parent run and the local Ray",
        signal.Signals(signum).name,
    )
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
