"""Peak resident memory of this process, whole-run and per phase (Linux), with no heavy imports.

``ru_maxrss`` is the peak since the process started (on Linux even the peak of the process image it
was ``exec``-ed from), so it is the loading's peak whenever loading costs more than training. To see the steady state on its own, :class:`PeakPhases` reads the kernel's
high-water mark (``VmHWM`` in ``/proc/self/status``) at the end of each phase and resets it (writing
``5`` to ``/proc/self/clear_refs``), so the next phase's peak is its own. The whole-run peak is the
largest of the phases, which :func:`peak_rss_mb` keeps returning after a reset.

Where ``/proc`` is missing or not writable (macOS, some sandboxes), the phases cannot be told apart and
every phase reports the whole-run peak so far; :attr:`PeakPhases.separated` says which one you got.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_before_reset_mb = 0.0  # the largest high-water mark read just before a reset, in MiB


def _hwm_mb() -> float | None:
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (or last ``exec``), in MiB, resets by
    :class:`PeakPhases` included.

    The kernel's ``VmHWM`` where ``/proc`` has it; else ``ru_maxrss``, which Linux carries across
    ``exec``: a child started by a process holding 1 GB reports at least 1 GB there, whatever it uses.
    """
    hwm = _hwm_mb()
    if hwm is None:
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _before_reset_mb)
    return max(hwm, _before_reset_mb)


def rss_breakdown_mb() -> dict[str, float]:
    """This process's resident memory now, by kind (``/proc/self/status``): ``anonymous`` (heaps, tensors,
    thread stacks), ``file`` (mapped code and files: shared libraries, memory-mapped weights) and
    ``shmem``; empty where ``/proc`` has no such fields."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return {}
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE))
    wanted = {"rss": "VmRSS", "anonymous": "RssAnon", "file": "RssFile", "shmem": "RssShmem"}
    return {name: int(fields[key]) / 1024 for name, key in wanted.items() if key in fields}


class PeakPhases:
    """Each phase's peak resident memory: call :meth:`mark` at the end of each phase.

    >>> phases = PeakPhases()
    >>> model = load()                 # doctest: +SKIP
    >>> phases.mark("load")            # doctest: +SKIP
    >>> first_step(); phases.mark("warmup"); more_steps(); phases.mark("steady")  # doctest: +SKIP
    >>> phases.peaks_mb                # {"load": ..., "warmup": ..., "steady": ...}  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.peaks_mb: dict[str, float] = {}
        self.separated = _hwm_mb() is not None  # until a reset fails

    def mark(self, phase: str) -> float:
        """Record the peak since the previous mark (or the process start) as ``phase``'s, reset the
        high-water mark; returns the peak."""
        global _before_reset_mb
        hwm = _hwm_mb() if self.separated else None
        peak = hwm if hwm is not None else peak_rss_mb()
        self.peaks_mb[phase] = peak
        if self.separated:
            _before_reset_mb = max(_before_reset_mb, peak)
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                self.separated = False
        return peak

    @property
    def whole_run_mb(self) -> float:
        return max([peak_rss_mb(), *self.peaks_mb.values()])

