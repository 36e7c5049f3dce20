"""Named fault points: a test hook that makes a process fail at a chosen place, never at a chosen time.

Code that a fault test must be able to interrupt calls :func:`fault_point` at a named place::

    fault_point("server:after_train_step", step=engine.step)

It does nothing unless the environment variable ``MOBILLM_FAULTS`` names that point. Its value is a list
of ``<point>[@N]=<action>`` entries separated by commas, e.g.::

    MOBILLM_FAULTS="device:after_hello=sigint"
    MOBILLM_FAULTS="server:after_train_step@5=kill,device:during_validation=ready"

* ``<point>`` is ``<role>:<name>``: the role says in which process the point lives (``device``: the
  process that runs the Trainer; ``server``: a server process, or the server's handler behind an
  in-process link, which then runs in the device's process).
* ``@N`` picks one occurrence: when the point reports a ``step`` in its context (see the table), it fires
  when ``step == N``; otherwise the ``N``-th time this process reaches the point (1-based). Without ``@N``
  it fires every time.
* ``<action>``: ``sigint`` (send SIGINT to this process: a Ctrl-C), ``kill`` (SIGKILL this process),
  ``exit`` (``os._exit(3)``: no cleanup), ``raise`` (raise :class:`FaultInjected`), ``ready`` (only print
  the marker line and go on).

Every action first prints one line ``MOBILLM_FAULT_REACHED <point> key=value ...`` (the point's context)
on stdout, so a test can wait for a line instead of sleeping.

**Once per directory.** A restarted process inherits the environment and would fail at the same point
again (a server restarted by its device replays the step it was killed at). If ``MOBILLM_FAULTS_DIR`` names a
folder, a fault fires only if it can create the file ``<folder>/<point>@<N>.fired`` first (``O_EXCL``): each
entry fires once over all processes that share the folder.

Points placed in the code:

========================== ===============================================================================
``device:after_hello``      the hello's reply arrived (context: ``server_pid``)
``device:frame_in_flight``  a training frame was queued and its reply not yet read (``step``, ``server_pid``)
``device:after_train_step`` the device finished ``step`` training steps and Lightning's batch-end hooks
                            (e.g. a ModelCheckpoint at that step) ran: reached at the start of the next
                            batch (``step`` = steps done, ``server_pid``)
``device:during_validation`` a validation batch was forwarded (``server_pid``)
``device:during_checkpoint`` inside the strategy's checkpoint save, after the server's state was fetched
                            and before the file is written (``step``, ``server_pid``)
``server:after_train_step`` the server applied a training step and has not sent its reply (``step`` = steps
                            applied, ``session``); also in the split server
``server:after_checkpoint`` a session's checkpoint was written (``step``, ``session``)
========================== ===============================================================================
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ACTIONS", "ENV", "ENV_DIR", "MARKER", "FaultInjected", "FaultSpec", "fault_point", "parse_faults"]

ENV = "MOBILLM_FAULTS"
ENV_DIR = "MOBILLM_FAULTS_DIR"
MARKER = "MOBILLM_FAULT_REACHED"
ACTIONS = ("sigint", "kill", "exit", "raise", "ready")
#: the exit code of the ``exit`` action
EXIT_CODE = 3


class FaultInjected(RuntimeError):
    """Raised by a fault point whose action is ``raise``."""


@dataclass(frozen=True)
class FaultSpec:
    point: str
    at: int | None
    action: str

    @property
    def label(self) -> str:
        return self.point + (f"@{self.at}" if self.at is not None else "")


def parse_faults(text: str) -> dict[str, list[FaultSpec]]:
    """``MOBILLM_FAULTS``'s value as ``{point: [specs]}``; raises ValueError naming a malformed entry."""
    table: dict[str, list[FaultSpec]] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        where, eq, action = entry.partition("=")
        point, _, at = where.strip().partition("@")
        role, colon, name = point.partition(":")
        if not eq or not colon or not role or not name or action.strip() not in ACTIONS:
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected <role>:<point>[@N]=<{'|'.join(ACTIONS)}>")
        try:
            n = int(at) if at else None
        except ValueError:
            raise ValueError(f"{ENV}: bad occurrence in {entry!r} (@N takes an integer)") from None
        table.setdefault(point, []).append(FaultSpec(point, n, action.strip()))
    return table


_parsed: tuple[str, dict[str, list[FaultSpec]]] = ("", {})
_reached: dict[str, int] = {}


def _table() -> dict[str, list[FaultSpec]]:
    global _parsed
    text = os.environ.get(ENV, "")
    if text != _parsed[0]:  # parsed once per value (tests may change it within a process)
        _parsed = (text, parse_faults(text))
        _reached.clear()
    return _parsed[1]


def fault_point(name: str, **context: Any) -> None:
    """A named place where a test may make this process fail (see the module docstring). Costs one
    environment lookup when ``MOBILLM_FAULTS`` is unset."""
    if ENV not in os.environ:
        return
    specs = _table().get(name)
    if not specs:
        return
    count = _reached[name] = _reached.get(name, 0) + 1
    for spec in specs:
        occurrence = context.get("step", count) if "step" in context else count
        if spec.at is not None and occurrence != spec.at:
            continue
        if not _first_time(spec):
            continue
        _fire(spec, context)


def _first_time(spec: FaultSpec) -> bool:
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return True
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{spec.label.replace(':', '-')}.fired"
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def _fire(spec: FaultSpec, context: dict[str, Any]) -> None:
    details = " ".join(f"{k}={v}" for k, v in context.items())
    print(f"{MARKER} {spec.point} action={spec.action} pid={os.getpid()} {details}".rstrip(), flush=True)
    sys.stderr.flush()
    if spec.action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)  # the handler (KeyboardInterrupt) runs before os.kill returns
    elif spec.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec.action == "exit":
        os._exit(EXIT_CODE)
    elif spec.action == "raise":
        raise FaultInjected(f"fault injected at {spec.label}")
