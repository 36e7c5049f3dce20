"""A deterministic virtual clock for simulating a federation on one machine (issue 10).

Measured compute and counted bytes become simulated wall time; nothing sleeps and nothing is sent.

* :class:`FedDeviceProfile`: one kind of federated device, by composition of ``simulate.py``'s
  :class:`~lightning_mobillm.simulate.DeviceProfile` (compute speed relative to this CPU) and
  :class:`~lightning_mobillm.simulate.Link` (up/down bandwidth, latency), plus availability windows and a
  dropout probability. :func:`assign_profiles` deals a weighted mix of profiles to N devices, seeded.
* :func:`device_timeline` (and :func:`upload_arrival`, :func:`download_done`): when a device's download,
  compute and upload end, honouring its windows.
* :class:`VirtualClock`: an event queue (``heapq``) ordered by (virtual time, scheduling order).
* :func:`plan_uploads` and :func:`run_async`: the asynchronous federation. Every device forwards its
  shard once and uploads once; the server trains on arrivals as soon as it is free and replays its cache
  in between. :func:`run_rounds`: the synchronous (FedAvg-style) variant, rounds that wait for every
  selected device. Both are driven by callbacks: the caller prices each server step (``step_cost``,
  measured once per backbone type and replayed) and trains in ``on_step`` / ``on_round``.

Semantics chosen here:

* **Windows**: a device works (downloads, computes, uploads) only while online. Work that meets the end
  of a window **resumes** where it stopped at the next window (rather than restarting): an upload goes on
  from the bytes already sent (a resumable upload), the forward pass from where it stopped. A latency is
  charged once per transfer, not again on resuming.
* **Dropout**: a device drops with probability ``dropout``, drawn from ``(seed, round, device)`` alone (so a
  device's fate does not depend on N or on the order of devices). In the asynchronous federation each
  device uploads once, so dropping is for good: its upload never arrives. In :func:`run_rounds` dropout is
  per round: the device misses that round and may be selected again. The asynchronous plan draws as
  round 0 does, so with ``buffer`` = all devices and no replay the two drivers agree, upload for upload.
* A transfer of zero bytes takes no time (no message, no latency); a :class:`~lightning_mobillm.simulate.Link`
  latency (a round trip) is charged once per transfer.

Written here rather than taken from a library: Plato's ``simulate_wall_time`` and FedScale's device and
behaviour traces live inside those frameworks' own servers and clients (``plato-learn`` and ``fedscale`` are
whole frameworks, not pieces to call from our loop), and SimPy's process model would be a dependency for
what here is a heap and a few sums. Plain Python: no torch, no numpy (seeded draws use ``random.Random``
seeded by a string, which, unlike ``hash()``, is the same in every process).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, TypeVar

from lightning_mobillm.simulate import LINKS, PROFILES, DeviceProfile, Link

E = TypeVar("E")
StepKind = Literal["arrival", "replay", "aggregate"]
#: ``step_cost(kind, uploads)``: virtual seconds the server is busy for one step of ``kind`` on ``uploads``
#: (empty for a replay step, whose samples the caller picks from its cache)
StepCost = Callable[[str, "tuple[Upload, ...]"], float]


def _draw(seed: int, stream: str, round_index: int, device: int) -> float:
    """A uniform number in [0, 1) that depends only on its arguments (``random`` seeds a str by SHA-512)."""
    return random.Random(f"lightning_mobillm.fed.clock/{stream}/{seed}/{round_index}/{device}").random()


# --------------------------------------------------------------------------- device profiles


@dataclass(frozen=True)
class FedDeviceProfile:
    """A kind of federated device: compute speed, link, when it is online, how likely it drops out.

    Args:
        device: compute speed relative to this CPU (measured seconds are divided by :attr:`speed`) and
            memory; a profile given by ``achievable_gflops`` only needs :meth:`resolve` first.
        link: uplink and downlink bandwidth and latency (charged once per transfer).
        windows: ``(open, close)`` intervals of virtual seconds when the device is online, sorted and not
            overlapping; online at ``open``, offline at ``close``. Empty = always online.
        period_s: the windows repeat every ``period_s`` seconds (then ``0 <= open < close <= period_s``),
            e.g. ``((0, 8 * 3600),)`` with ``86400`` = online 8 hours a day. ``None`` = they happen once.
        phase_s: shifts every window by this many seconds (:func:`assign_profiles` can stagger devices).
        dropout: probability that the device drops out (for good in the asynchronous federation, per round
            in :func:`run_rounds`; see the module docstring).
    """

    device: DeviceProfile
    link: Link
    windows: tuple[tuple[float, float], ...] = ()
    period_s: float | None = None
    phase_s: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        windows = tuple((float(o), float(c)) for o, c in self.windows)
        object.__setattr__(self, "windows", windows)
        if self.device.speed_vs_this_cpu is not None and not self.device.speed_vs_this_cpu > 0:
            raise ValueError(f"{self.name}: speed must be > 0, got {self.device.speed_vs_this_cpu}")
        down = self.link.mbit_per_s if self.link.down_mbit_per_s is None else self.link.down_mbit_per_s
        if not (self.link.mbit_per_s > 0 and down > 0 and self.link.latency_ms >= 0):
            raise ValueError(f"{self.name}: bandwidths must be > 0 and latency >= 0, got {self.link}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1], got {self.dropout}")
        if not math.isfinite(self.phase_s):
            raise ValueError(f"{self.name}: phase_s must be finite, got {self.phase_s}")
        if self.period_s is not None and not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"{self.name}: period_s must be > 0, got {self.period_s}")
        if self.period_s is not None and not windows:
            raise ValueError(f"{self.name}: period_s needs windows")
        previous_close = -math.inf
        for o, c in windows:
            if not (math.isfinite(o) and math.isfinite(c) and o < c and o >= previous_close):
                raise ValueError(f"{self.name}: windows must be finite, open < close, sorted and not "
                                 f"overlapping, got {windows}")
            if self.period_s is not None and not (o >= 0 and c <= self.period_s):
                raise ValueError(f"{self.name}: periodic windows must lie in [0, {self.period_s}], got {windows}")
            previous_close = c

    @classmethod
    def from_names(cls, device: str, link: str, **kwargs: Any) -> FedDeviceProfile:
        """A profile from the names of :data:`~lightning_mobillm.simulate.PROFILES` and ``LINKS``."""
        return cls(PROFILES[device], LINKS[link], **kwargs)

    @property
    def name(self) -> str:
        return f"{self.device.name}@{self.link.name}"

    @property
    def speed(self) -> float:
        """Compute speed relative to this CPU (raises for a profile that still needs :meth:`resolve`)."""
        return self.device.factor(None)

    def resolve(self, cpu_gflops: float) -> FedDeviceProfile:
        """This profile with its speed fixed from this CPU's measured GFLOPS (``measure_cpu_gflops``)."""
        return replace(self, device=replace(self.device, speed_vs_this_cpu=self.device.factor(cpu_gflops)))

    def up_s(self, nbytes: float) -> float:
        """Online seconds to upload ``nbytes``: latency + bits / uplink bandwidth (0 for no bytes)."""
        return 0.0 if nbytes == 0 else self.link.latency_ms / 1000 + self.link.transfer_s(nbytes, 0)

    def down_s(self, nbytes: float) -> float:
        """Online seconds to download ``nbytes``: latency + bits / downlink bandwidth (0 for no bytes)."""
        return 0.0 if nbytes == 0 else self.link.latency_ms / 1000 + self.link.transfer_s(0, nbytes)

    def intervals(self, t: float) -> Iterator[tuple[float, float]]:
        """The absolute online intervals that end after ``t``, in time order (endless when periodic)."""
        if not self.windows:
            yield (-math.inf, math.inf)
            return
        if self.period_s is None:
            yield from ((o + self.phase_s, c + self.phase_s) for o, c in self.windows if c + self.phase_s > t)
            return
        k = math.floor((t - self.phase_s) / self.period_s) - 1  # one period early: safe against rounding
        while True:
            base = self.phase_s + k * self.period_s
            yield from ((base + o, base + c) for o, c in self.windows if base + c > t)
            k += 1

    def next_online(self, t: float) -> float:
        """The earliest time >= ``t`` at which the device is online (``inf`` if never again)."""
        return next((max(t, o) for o, _ in self.intervals(t)), math.inf)

    def online_at(self, t: float) -> bool:
        return self.next_online(t) == t

    def finish(self, start: float, online_s: float) -> float:
        """When ``online_s`` seconds of work begun at ``start`` end, working only while online and resuming
        across windows (``inf`` if the windows run out first). Zero work ends at ``start``."""
        if online_s <= 0:
            return start
        left = online_s
        for o, c in self.intervals(start):
            begin = max(start, o)
            if begin + left <= c:
                return begin + left
            left -= c - begin
        return math.inf


def assign_profiles(
    n: int,
    mix: Mapping[FedDeviceProfile, float] | Sequence[tuple[FedDeviceProfile, float]],
    seed: int = 0,
    stagger: bool = False,
) -> list[FedDeviceProfile]:
    """Profiles for devices ``0..n-1``: a mix of profiles given by weights, dealt in a seeded order.

    Counts follow the weights exactly where they can (largest remainder: weights 3:1 over 8 devices give 6
    and 2, ties to the earlier profile), then a seeded shuffle decides which device gets which. With
    ``stagger``, each device of a periodic profile gets its own seeded phase in ``[0, period_s)``, so not
    every phone is online in the same hours.
    """
    items = list(mix.items()) if isinstance(mix, Mapping) else list(mix)
    if n < 0 or not items or any(not (w >= 0) for _, w in items) or not sum(w for _, w in items) > 0:
        raise ValueError(f"need n >= 0 and a non-empty mix with weights >= 0 and a positive sum, got {n}, {items}")
    total = sum(w for _, w in items)
    quotas = [n * w / total for _, w in items]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(items)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    dealt = [profile for (profile, _), count in zip(items, counts) for _ in range(count)]
    random.Random(f"lightning_mobillm.fed.clock/assign/{seed}").shuffle(dealt)
    if stagger:
        dealt = [
            replace(p, phase_s=_draw(seed, "phase", 0, d) * p.period_s) if p.period_s is not None else p
            for d, p in enumerate(dealt)
        ]
    return dealt


# --------------------------------------------------------------------------- a device's timeline


@dataclass(frozen=True)
class DeviceWork:
    """What one device does for one upload: ``compute_s`` measured on this CPU (divided by the profile's
    speed on the clock), bytes up, and bytes down before it starts (a model to train, or 0)."""

    compute_s: float
    bytes_up: float
    bytes_down: float = 0.0

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) and v >= 0 for v in (self.compute_s, self.bytes_up, self.bytes_down)):
            raise ValueError(f"work must be finite and >= 0, got {self}")


@dataclass(frozen=True)
class DeviceTimeline:
    """When a device's download, compute and upload ended (``inf``: its windows ran out first), with what it
    cost it: ``compute_s`` in virtual seconds (measured / speed) and the bytes each way."""

    device: int
    start: float
    downloaded_at: float
    computed_at: float
    arrived_at: float
    compute_s: float
    bytes_up: float
    bytes_down: float


def device_timeline(
    profile: FedDeviceProfile, work: DeviceWork, start: float = 0.0, device: int = 0
) -> DeviceTimeline:
    """Download, then compute, then upload, each only while the device is online (resuming across windows)."""
    compute_s = work.compute_s / profile.speed
    downloaded = profile.finish(start, profile.down_s(work.bytes_down))
    computed = profile.finish(downloaded, compute_s)
    arrived = profile.finish(computed, profile.up_s(work.bytes_up))
    return DeviceTimeline(device, start, downloaded, computed, arrived, compute_s, work.bytes_up, work.bytes_down)


def upload_arrival(profile: FedDeviceProfile, compute_s: float, bytes_up: float, start: float = 0.0) -> float:
    """``start + compute_s / speed + latency + bytes_up * 8 / uplink``, plus any offline time in between."""
    return device_timeline(profile, DeviceWork(compute_s, bytes_up), start).arrived_at


def download_done(profile: FedDeviceProfile, bytes_down: float, start: float = 0.0) -> float:
    """When a download begun at ``start`` (e.g. the parts a device needs to evaluate) has arrived."""
    return profile.finish(start, profile.down_s(bytes_down))


# --------------------------------------------------------------------------- the event queue


class VirtualClock(Generic[E]):
    """An event queue in virtual time: events come out by time, ties in the order they were scheduled.

    ``now`` is the time of the last popped event; nothing may be scheduled before it. ``wall_s`` is the
    simulator's own wall time since the clock was made, reported apart from virtual time.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._heap: list[tuple[float, int, E]] = []
        self._seq = 0
        self._wall0 = time.perf_counter()

    @property
    def now(self) -> float:
        return self._now

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._wall0

    def schedule(self, at: float, event: E) -> None:
        """Queue ``event`` at virtual time ``at`` (finite, not before :attr:`now`)."""
        if not (math.isfinite(at) and at >= self._now):
            raise ValueError(f"cannot schedule at {at}: must be finite and >= now ({self._now})")
        heapq.heappush(self._heap, (float(at), self._seq, event))
        self._seq += 1

    def peek_time(self) -> float | None:
        """The time of the next event, or ``None`` when the queue is empty."""
        return self._heap[0][0] if self._heap else None

    def pop(self) -> tuple[float, E]:
        """The next event and its time; advances :attr:`now` to it."""
        if not self._heap:
            raise IndexError("pop from an empty VirtualClock")
        at, _, event = heapq.heappop(self._heap)
        self._now = at
        return at, event

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[tuple[float, E]]:
        """Pops events until none is left (events scheduled meanwhile included)."""
        while self._heap:
            yield self.pop()


# --------------------------------------------------------------------------- the asynchronous federation


@dataclass(frozen=True)
class Upload:
    """One device's upload, arrived at the server at virtual time ``at``."""

    device: int
    at: float


@dataclass(frozen=True)
class UploadPlan:
    """Every device's timeline (index = device) and the uploads that arrive, in arrival order (ties by device).

    ``dropped``: devices that dropped out (their upload never arrives); ``unavailable``: devices whose
    windows ran out before their upload could arrive.
    """

    timelines: tuple[DeviceTimeline, ...]
    uploads: tuple[Upload, ...]
    dropped: tuple[int, ...]
    unavailable: tuple[int, ...]


def plan_uploads(
    profiles: Sequence[FedDeviceProfile], work: Sequence[DeviceWork], seed: int = 0, start: float = 0.0
) -> UploadPlan:
    """Devices ``0..N-1`` all start at ``start``, forward their shard once and upload once.

    Dropout is drawn per device as round 0 of :func:`run_rounds` draws it (see the module docstring).
    """
    if len(profiles) != len(work):
        raise ValueError(f"{len(profiles)} profiles but {len(work)} works")
    timelines = tuple(device_timeline(p, w, start, d) for d, (p, w) in enumerate(zip(profiles, work)))
    dropped = tuple(d for d, p in enumerate(profiles) if _draw(seed, "dropout", 0, d) < p.dropout)
    unavailable = tuple(t.device for t in timelines if t.device not in dropped and math.isinf(t.arrived_at))
    lost = set(dropped) | set(unavailable)
    arrivals = sorted((t.arrived_at, t.device) for t in timelines if t.device not in lost)
    return UploadPlan(timelines, tuple(Upload(d, at) for at, d in arrivals), dropped, unavailable)


@dataclass(frozen=True)
class Step:
    """One server step: ``arrival`` trains on ``uploads`` (in arrival order); ``replay`` trains on cached
    uploads the caller picks (``uploads`` is empty); ``aggregate`` closes a synchronous round."""

    index: int
    kind: StepKind
    start: float
    end: float
    uploads: tuple[Upload, ...] = ()


@dataclass(frozen=True)
class AsyncRun:
    """What :func:`run_async` did.

    ``end_s``: virtual time when the last step ended; ``server_busy_s``: the sum of step costs;
    ``untrained``: uploads that had arrived or were still to arrive when the run stopped; ``wall_s``: the
    simulator's own wall time, of which ``callback_s`` was spent in the caller's ``step_cost`` and ``on_step``.
    """

    steps: tuple[Step, ...]
    end_s: float
    server_busy_s: float
    untrained: tuple[Upload, ...]
    wall_s: float
    callback_s: float

    def count(self, kind: str) -> int:
        return sum(s.kind == kind for s in self.steps)


def _checked_cost(kind: str, cost: float) -> float:
    cost = float(cost)
    if not (math.isfinite(cost) and (cost > 0 if kind == "replay" else cost >= 0)):
        raise ValueError(f"step_cost({kind!r}) must be finite and {'>' if kind == 'replay' else '>='} 0, got {cost}")
    return cost


def run_async(
    uploads: Iterable[Upload],
    step_cost: StepCost,
    on_step: Callable[[Step], bool | None] | None = None,
    *,
    buffer: int = 1,
    replay: bool = True,
    final_replay_steps: int = 0,
    until_s: float | None = None,
    max_steps: int | None = None,
    start: float = 0.0,
) -> AsyncRun:
    """One server, busy ``step_cost(kind, uploads)`` virtual seconds per step, fed by ``uploads``.

    Whenever the server is free (after every event of that instant is in): if ``buffer`` uploads wait, it
    trains on the ``buffer`` oldest in one ``arrival`` step (``buffer=1``: each arrival as soon as the server
    is free; once no upload is still to come, whatever waits is trained even if fewer); otherwise, with
    ``replay`` and a non-empty cache of trained uploads, it takes a ``replay`` step (which must cost > 0);
    otherwise it idles until the next arrival. Steps are never preempted: an upload that lands during a
    step waits for its end. After the last upload was trained, ``final_replay_steps`` more replay steps run
    (the paper's further epochs over the cache). ``buffer`` = all devices with ``replay=False`` is one
    FedAvg-style round: one step when the last upload lands, as in :func:`run_rounds`.

    Ties between uploads arriving at the same instant keep the order of ``uploads``. The run stops early
    when ``on_step`` returns true, when a step would start at or after ``until_s``, or after ``max_steps``.
    """
    if buffer < 1 or final_replay_steps < 0:
        raise ValueError(f"buffer must be >= 1 and final_replay_steps >= 0, got {buffer}, {final_replay_steps}")
    wall0, callback_s = time.perf_counter(), 0.0
    clock: VirtualClock[Upload | None] = VirtualClock(start)  # None = "the server finished a step"
    for upload in uploads:
        clock.schedule(upload.at, upload)
    pending, waiting = len(clock), deque()
    steps: list[Step] = []
    cached = tail = 0
    busy = stopped = False
    while len(clock) and not stopped:
        t, event = clock.pop()
        if event is None:
            busy = False
        else:
            waiting.append(event)
            pending -= 1
        if busy or clock.peek_time() == t:
            continue
        if len(waiting) >= buffer or (waiting and not pending):
            kind = "arrival"
        elif replay and cached and (pending or tail < final_replay_steps):
            kind = "replay"
        else:
            continue
        if (until_s is not None and t >= until_s) or (max_steps is not None and len(steps) >= max_steps):
            break
        batch = tuple(waiting.popleft() for _ in range(min(buffer, len(waiting)))) if kind == "arrival" else ()
        c0 = time.perf_counter()
        cost = _checked_cost(kind, step_cost(kind, batch))
        callback_s += time.perf_counter() - c0
        step = Step(len(steps), kind, t, t + cost, batch)
        steps.append(step)
        if kind == "arrival":
            cached += len(batch)
        elif not pending and not waiting:
            tail += 1
        busy = True
        clock.schedule(step.end, None)
        c0 = time.perf_counter()
        stopped = bool(on_step(step)) if on_step is not None else False
        callback_s += time.perf_counter() - c0
    untrained = tuple(waiting) + tuple(e for _, e in clock if e is not None)
    return AsyncRun(
        steps=tuple(steps),
        end_s=steps[-1].end if steps else start,
        server_busy_s=sum(s.end - s.start for s in steps),
        untrained=untrained,
        wall_s=time.perf_counter() - wall0,
        callback_s=callback_s,
    )


# --------------------------------------------------------------------------- the synchronous variant


@dataclass(frozen=True)
class Round:
    """One synchronous round.

    ``selected`` devices (online at ``start``) each download, compute and upload (``timelines``);
    ``returned`` are the uploads aggregated, in arrival order; ``dropped`` missed the round by dropout;
    ``stragglers`` arrived after the timeout or never (their windows ran out). The server aggregates from
    ``closed_at`` to ``end`` (no aggregation when nothing returned).
    """

    index: int
    start: float
    selected: tuple[int, ...]
    timelines: Mapping[int, DeviceTimeline]
    returned: tuple[Upload, ...]
    dropped: tuple[int, ...]
    stragglers: tuple[int, ...]
    closed_at: float
    end: float


@dataclass(frozen=True)
class SyncRun:
    """What :func:`run_rounds` did: its rounds, when the last ended, the server's busy seconds (aggregation),
    and the simulator's own wall time (``callback_s`` of it in the caller's callbacks)."""

    rounds: tuple[Round, ...]
    end_s: float
    server_busy_s: float
    wall_s: float
    callback_s: float


def run_rounds(
    profiles: Sequence[FedDeviceProfile],
    work: Callable[[int, int], DeviceWork],
    step_cost: StepCost,
    on_round: Callable[[Round], bool | None] | None = None,
    *,
    rounds: int,
    fraction: float = 1.0,
    min_devices: int = 1,
    timeout_s: float | None = None,
    seed: int = 0,
    start: float = 0.0,
    until_s: float | None = None,
) -> SyncRun:
    """Synchronous rounds (FedAvg-style) over devices ``0..N-1``; ``work(round, device)`` prices a device.

    A round starts when the previous one ended (at the next time any device comes online, if none is) and
    selects ``max(min_devices, int(fraction * online))`` of the devices online then (all of them, or a
    seeded sample, as Flower's FedAvg counts). Each selected device downloads, computes and uploads from
    the round's start; dropout is drawn per round. Without ``timeout_s`` the round closes when the last
    device that did not drop has returned, so its time is the slowest device's download + compute + upload;
    with it, a round with a dropout or a straggler closes at ``start + timeout_s`` (the server cannot tell
    them apart). The server then aggregates for ``step_cost("aggregate", returned)`` seconds. The run stops
    after ``rounds``, when ``on_round`` returns true, when a round would start at or after ``until_s``, or
    when no device will ever be online again.
    """
    if not profiles or rounds < 0 or not 0 < fraction <= 1 or min_devices < 1:
        raise ValueError(f"need profiles, rounds >= 0, 0 < fraction <= 1, min_devices >= 1; got "
                         f"{len(profiles)}, {rounds}, {fraction}, {min_devices}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    for p in profiles:
        p.speed  # noqa: B018 - fail before the first round on a profile that still needs resolve()
    wall0, callback_s = time.perf_counter(), 0.0
    t, done, busy_s = float(start), [], 0.0
    for r in range(rounds):
        online = [d for d, p in enumerate(profiles) if p.online_at(t)]
        if not online:
            t = min(p.next_online(t) for p in profiles)
            if math.isinf(t):
                break
            online = [d for d, p in enumerate(profiles) if p.online_at(t)]
        if until_s is not None and t >= until_s:
            break
        k = min(len(online), max(min_devices, int(fraction * len(online))))
        rng = random.Random(f"lightning_mobillm.fed.clock/sample/{seed}/{r}")
        selected = tuple(online) if k == len(online) else tuple(sorted(rng.sample(online, k)))
        c0 = time.perf_counter()
        works = {d: work(r, d) for d in selected}
        callback_s += time.perf_counter() - c0
        timelines = {d: device_timeline(profiles[d], works[d], t, d) for d in selected}
        dropped = tuple(d for d in selected if _draw(seed, "dropout", r, d) < profiles[d].dropout)
        deadline = t + timeout_s if timeout_s is not None else math.inf
        arrivals = sorted((timelines[d].arrived_at, d) for d in selected if d not in dropped)
        returned = tuple(Upload(d, at) for at, d in arrivals if at <= deadline and math.isfinite(at))
        stragglers = tuple(d for at, d in arrivals if not (at <= deadline and math.isfinite(at)))
        if timeout_s is not None and (dropped or stragglers):
            closed = deadline
        else:
            closed = max((u.at for u in returned), default=t)
        c0 = time.perf_counter()
        cost = _checked_cost("aggregate", step_cost("aggregate", returned)) if returned else 0.0
        callback_s += time.perf_counter() - c0
        rnd = Round(r, t, selected, timelines, returned, dropped, stragglers, closed, closed + cost)
        done.append(rnd)
        busy_s += cost
        t = rnd.end
        c0 = time.perf_counter()
        stop = bool(on_round(rnd)) if on_round is not None else False
        callback_s += time.perf_counter() - c0
        if stop:
            break
    end_s = done[-1].end if done else float(start)
    return SyncRun(tuple(done), end_s, busy_s, time.perf_counter() - wall0, callback_s)
