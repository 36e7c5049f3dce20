"""Bounded server logs: what devices send ends up in log lines, so a line is truncated and a flood of
lines of one kind is rate-limited (:class:`LogLimiter`, installed on the server's loggers by ``serve``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

#: the loggers whose lines devices can provoke: the server runtime, its caches, and the link's refusals
SERVER_LOGGERS = ("lightning_mobillm.server", "lightning_mobillm.server.cache", "lightning_mobillm.transport.link")


class LogLimiter(logging.Filter):
    """Truncate each line to ``max_chars`` and let through at most ``per_window`` lines of one template
    (logger, level and unformatted message) per ``window_s``.

    The first line over the limit is replaced by a note that further ones are suppressed; the first line
    of that template in a later window says how many were suppressed. ``clock`` is injectable for tests.
    """

    def __init__(self, *, max_chars: int = 1000, per_window: int = 20, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_templates: int = 1000) -> None:
        super().__init__()
        self.max_chars = max_chars
        self.per_window = per_window
        self.window_s = window_s
        self.clock = clock
        self.max_templates = max_templates
        self._windows: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [start, passed, suppressed]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            return self._filter(record)

    def _filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, record.levelno, str(record.msg)[:200])
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            suppressed = window[2] if window is not None else 0
            if window is None and len(self._windows) >= self.max_templates:
                self._forget_old(now)
            self._windows[key] = [now, 1, 0]
            self._truncate(record)
            if suppressed:
                record.msg = f"{record.msg} [{suppressed} similar lines suppressed]"
            return True
        if window[1] < self.per_window:
            window[1] += 1
            self._truncate(record)
            return True
        window[2] += 1
        if window[2] == 1:  # say once that lines are being dropped, then drop them
            record.msg = "further lines like %r suppressed for up to %.0f s"
            record.args = (str(key[2])[:200], self.window_s - (now - window[0]))
            record.exc_info = record.exc_text = record.stack_info = None
            return True
        return False

    def _truncate(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to logging's own error report
            return
        if len(message) > self.max_chars:
            record.msg = f"{message[:self.max_chars]}... [{len(message) - self.max_chars} chars truncated]"
            record.args = ()

    def _forget_old(self, now: float) -> None:
        """Drop templates whose window has passed (and, if that is not enough, all of them)."""
        for key in [k for k, w in self._windows.items() if now - w[0] >= self.window_s]:
            del self._windows[key]
        if len(self._windows) >= self.max_templates:
            self._windows.clear()


def install_log_limits(limiter: LogLimiter | None = None, names: Iterable[str] = SERVER_LOGGERS) -> LogLimiter:
    """Put one :class:`LogLimiter` on each logger in ``names`` (replacing an earlier one); returns it."""
    limiter = limiter or LogLimiter()
    for name in names:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, LogLimiter)]:
            logger.removeFilter(old)
        logger.addFilter(limiter)
    return limiter
