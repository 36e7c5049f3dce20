"""Run a benchmark's measured parts each in a fresh process (so peak memory and state are its own).

:func:`run_child` runs a part and returns what it reported; :func:`run_watched` also guards the machine
with a memory watchdog, for parts that may not fit in memory (on-device fine-tuning of a 1.5B model).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

PREFIX = "RESULT "


def report(result: dict) -> None:
    """Called in the child: hand one JSON result to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(script: str, name: str, argv: list[str]) -> dict:
    """Run ``script --child name argv...`` in a fresh interpreter and return what it reported."""
    cmd = [sys.executable, script, "--child", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} child failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(PREFIX):])
    print(name, json.dumps(result), flush=True)
    return result


@dataclass
class WatchedRun:
    """What :func:`run_watched` saw of one child process.

    Attributes:
        returncode: the child's exit status (negative: killed by that signal).
        exceeded: True if the watchdog killed the child because the machine ran low on memory.
        sampled_peak_rss_mb: the largest RSS of the child process itself seen by the watchdog (sampled
            every ``poll_s``, so a lower bound of its true peak).
        tree_peak_rss_mb: the largest summed RSS of the child and its descendants (e.g. an embedded
            server process) seen by the watchdog.
        min_available_mb: the least available memory of the machine seen while the child ran.
        max_load1: the highest 1-minute load average seen while it ran; well above the child's own
            threads, other jobs competed for the CPU and its timings are inflated.
        wall_s: the child's wall-clock time.
        stdout: the child's standard output (also kept in ``log_prefix.stdout`` if given).
        stderr: its standard error.
    """

    returncode: int
    exceeded: bool
    sampled_peak_rss_mb: float
    tree_peak_rss_mb: float
    min_available_mb: float
    max_load1: float
    wall_s: float
    stdout: str
    stderr: str

    def result(self) -> dict | None:
        """The last ``RESULT`` line the child printed with :func:`report`, if any."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith(PREFIX)]
        return json.loads(lines[-1][len(PREFIX):]) if lines else None


def run_watched(
    cmd: list[str],
    *,
    min_available_mb: float = 1536.0,
    poll_s: float = 0.05,
    env: dict[str, str] | None = None,
    log_prefix: str | os.PathLike | None = None,
) -> WatchedRun:
    """Run ``cmd`` in its own process group and kill the group if the machine's memory runs low.

    Every ``poll_s`` seconds the watchdog reads the machine's available memory and the child's RSS (the
    RSS of its descendants less often). When the available memory falls under ``min_available_mb``,
    the whole process group (the child and whatever it started, and nothing else) gets ``SIGKILL``
    before the kernel's OOM killer has to choose a victim, and the run is marked ``exceeded``.
    Output goes to files (``log_prefix`` + ``.stdout``/``.stderr``, or temporary files), so a chatty
    child never blocks on a full pipe.
    """
    import psutil

    with contextlib.ExitStack() as stack:
        if log_prefix is None:
            out_f = stack.enter_context(tempfile.TemporaryFile("w+"))
            err_f = stack.enter_context(tempfile.TemporaryFile("w+"))
        else:
            out_f = stack.enter_context(open(f"{log_prefix}.stdout", "w+"))
            err_f = stack.enter_context(open(f"{log_prefix}.stderr", "w+"))
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out_f, stderr=err_f, text=True, start_new_session=True, env=env or dict(os.environ)
        )
        exceeded = False
        peak = tree_peak = 0
        min_avail = float("inf")
        max_load = 0.0
        tree_every = max(1, round(0.5 / poll_s))
        try:
            child = psutil.Process(proc.pid)
            tick = 0
            while proc.poll() is None:
                avail = psutil.virtual_memory().available
                min_avail = min(min_avail, avail)
                with contextlib.suppress(psutil.Error):
                    rss = child.memory_info().rss
                    peak = max(peak, rss)
                    if tick % tree_every == 0:
                        max_load = max(max_load, os.getloadavg()[0])
                        for c in child.children(recursive=True):
                            with contextlib.suppress(psutil.Error):
                                rss += c.memory_info().rss
                        tree_peak = max(tree_peak, rss)
                if avail < min_available_mb * 2**20:
                    exceeded = True
                    _kill_group(proc)
                    break
                tick += 1
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C) or killed above: leave no orphans behind
                _kill_group(proc)
            proc.wait()
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        return WatchedRun(
            returncode=proc.returncode,
            exceeded=exceeded,
            sampled_peak_rss_mb=peak / 2**20,
            tree_peak_rss_mb=max(tree_peak, peak) / 2**20,
            min_available_mb=min_avail / 2**20 if min_avail != float("inf") else float("nan"),
            max_load1=max_load,
            wall_s=wall,
            stdout=out_f.read(),
            stderr=err_f.read(),
        )


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (started with ``start_new_session=True``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
