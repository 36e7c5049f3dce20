"""Server-side storage behind PAE's activation cache: a bounded in-memory LRU that spills to safetensors.

The backbone is frozen, so the activations (and the device-defined target) of a training sample never go
stale: the server keeps every sample it has received under an opaque key the device chose (a keyed hash
that reveals nothing about the text), and later epochs train from the cache instead of asking the device
to forward the sample again.

Storage model
-------------
* Entries live in memory (CPU tensors, dtypes kept as given, e.g. still-quantised ``acts.q``) in LRU
  order. When the in-memory bytes exceed ``memory_limit_mb``, the least-recently-used entries are
  spilled until the store is back under ``LOW_WATER`` x the limit (so a spill is a batch, not one sample).
* A spill (or :meth:`ActivationStore.flush`) writes one safetensors file per batch of entries
  (``{name}-{n:06d}.safetensors``, at most ``max_file_mb`` each; tensor ``"{slot}.{tensor}"`` is tensor
  ``tensor`` of the batch's ``slot``-th entry; the file's metadata lists the keys). Files are written
  to a temporary name, fsynced and renamed; they are never modified afterwards. Nothing is pickled and
  nothing is read back with ``torch.load``: reads take exact byte ranges recorded in the index.
* Every entry on disk has a sha256 (see :func:`entry_digest`: over the key, each tensor's name, dtype,
  shape and raw bytes) recorded in the index and checked on every read. An entry whose file is missing,
  truncated or whose bytes do not match is dropped and reported as *missing* (logged with a warning), so
  the caller asks the device to resend it; it is never returned.
* :meth:`flush` persists every in-memory entry (keeping it in memory too) and writes the index
  ``{name}.index.json`` atomically; :meth:`ActivationStore.open` reopens a folder from that index after a
  restart (entries load lazily). Only what the last :meth:`flush` / :meth:`close` recorded survives a
  crash; spill files written after it are unreferenced and removed by the next :meth:`open`.

A store owns the files named after it in its folder: constructing a *new* store removes a previous
store of the same name there (use :meth:`open` to resume one). All public methods take one lock, so a
store can be shared by the threads of the gRPC server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch

log = logging.getLogger("lightning_mobillm.server.cache")

FORMAT = "lightning_mobillm.activation_store"
VERSION = 1

_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TENSOR_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")

#: dtypes a store accepts (all of them round-trip through safetensors).
DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}


def validate_key(key: Any) -> str:
    """Return ``key`` if it is a valid sample key (1-128 chars of ``[A-Za-z0-9_-]``), else raise ValueError."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        shown = key if not isinstance(key, str) or len(key) <= 40 else key[:40] + "..."
        raise ValueError(f"invalid cache key {shown!r}: keys are 1-128 characters of [A-Za-z0-9_-]")
    return key


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw(t: torch.Tensor) -> Any:
    """The bytes of a contiguous CPU tensor as a buffer (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def entry_digest(key: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of one entry: the key, then per tensor (sorted by name) ``"name|dtype|[shape]\\n"`` and its bytes."""
    h = hashlib.sha256()
    h.update(key.encode() + b"\n")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}\n".encode())
        if t.numel():
            h.update(_raw(t))
    return h.hexdigest()


@dataclass
class _Loc:
    """Where an entry lives on disk: its file, each tensor's absolute byte range, its checksum."""

    file: str
    offsets: dict[str, tuple[int, int]]
    sha256: str
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "offsets": {n: list(r) for n, r in self.offsets.items()},
            "sha256": self.sha256,
            "shapes": self.shapes,
            "dtypes": self.dtypes,
        }


class _Entry:
    __slots__ = ("tensors", "nbytes", "loc")

    def __init__(self, tensors: dict[str, torch.Tensor] | None, nbytes: int, loc: _Loc | None = None) -> None:
        self.tensors = tensors
        self.nbytes = nbytes
        self.loc = loc


class ActivationStore:
    """Per-session cache of training samples the server has received, keyed by an opaque device-side sample key.

    Args:
        folder: directory for spill files and the index (created if needed).
        memory_limit_mb: bound on the bytes of tensors held in memory; above it the least-recently-used
            entries are spilled to disk. ``0`` writes every entry to disk as soon as it is put;
            ``math.inf`` (or a very large number) never spills until :meth:`flush`.
        name: the store's name; its files are ``{name}-NNNNNN.safetensors`` and ``{name}.index.json``.
        max_file_mb: largest spill file to write (a batch of entries is split across files above it).

    Counters (for ``cache/hits``, ``cache/misses``, ``cache/bytes``): :attr:`hits` and :attr:`misses` count
    keys looked up by :meth:`get_many` (one per key per call), :attr:`corrupt` counts entries dropped
    because their file was missing, truncated or failed its checksum, :attr:`bytes_in_memory` and
    :attr:`bytes_on_disk` the bytes held in each place (an entry may be in both after a flush).
    """

    #: after a spill, in-memory bytes are at most this fraction of the limit.
    LOW_WATER = 0.75

    def __init__(
        self, folder: str | Path, memory_limit_mb: float = 512, name: str = "cache", *, max_file_mb: float = 64
    ) -> None:
        self._setup(folder, memory_limit_mb, name, max_file_mb)
        removed = self._remove_files(set(), index_too=True)
        if removed:
            log.info("cache %s: removed %d files of a previous store in %s", name, removed, self.folder)

    # ---- construction --------------------------------------------------------------------------
    def _setup(self, folder: str | Path, memory_limit_mb: float, name: str, max_file_mb: float) -> None:
        if _KEY_RE.fullmatch(name or "") is None:
            raise ValueError(f"invalid store name {name!r}: 1-128 characters of [A-Za-z0-9_-]")
        if not memory_limit_mb >= 0:
            raise ValueError(f"memory_limit_mb must be >= 0, got {memory_limit_mb}")
        if not max_file_mb > 0:
            raise ValueError(f"max_file_mb must be > 0, got {max_file_mb}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.memory_limit_mb = memory_limit_mb
        self._limit: int | None = None if math.isinf(memory_limit_mb) else int(memory_limit_mb * 2**20)
        self._max_file_bytes = max(1, int(max_file_mb * 2**20)) if not math.isinf(max_file_mb) else None
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # keys with tensors in memory, oldest first
        self._files: dict[str, dict[str, int]] = {}  # file -> {"bytes", "live"}
        self._dead_files: set[str] = set()  # no live entries; deleted after the next index write
        self._next_file = 0
        self._mem_bytes = 0
        self._closed = False
        self._data_re = re.compile(rf"{re.escape(name)}-(\d{{6,}})\.safetensors")
        self._tmp_re = re.compile(rf"{re.escape(name)}(-\d{{6,}}\.safetensors|\.index\.json)\.tmp")
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.files_written = 0
        #: bound on the bytes of all entries (memory and disk); :meth:`put_many` stores nothing beyond it
        self.quota_bytes: int | None = None

    @property
    def index_path(self) -> Path:
        return self.folder / f"{self.name}.index.json"

    @classmethod
    def open(
        cls,
        folder: str | Path,
        memory_limit_mb: float = 512,
        name: str = "cache",
        *,
        index: dict | None = None,
        max_file_mb: float = 64,
    ) -> ActivationStore:
        """Reopen the store ``name`` in ``folder`` from its index (after a restart); entries load lazily.

        ``index`` overrides the index file (e.g. one kept in a checkpoint). Entries whose file is gone or
        too short are dropped now, entries that fail their checksum when read; either way they count as
        missing and are logged. Files of this store that the index does not reference (spills after the
        last flush, temporaries) are removed. A folder without an index opens as an empty store.
        """
        self = cls.__new__(cls)
        self._setup(folder, memory_limit_mb, name, max_file_mb)
        if index is None:
            index = self._read_index_file()
        if index is not None:
            self._load_index(index)
        removed = self._remove_files(set(self._files), index_too=False)
        if removed:
            log.info("cache %s: removed %d unreferenced files in %s", name, removed, self.folder)
        log.info("cache %s: opened %s with %d entries (%d bytes on disk)", name, self.folder, len(self._entries),
                 self.bytes_on_disk)
        return self

    def _read_index_file(self) -> dict | None:
        path = self.index_path
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("cache %s: index %s is unreadable (%s); starting empty", self.name, path, err)
            return None

    def _load_index(self, index: Any) -> None:
        if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("entries"), dict):
            log.warning("cache %s: index is not an activation-store index; starting empty", self.name)
            return
        if index.get("version") != VERSION:
            raise ValueError(f"cache index version {index.get('version')!r} is not supported (expected {VERSION})")
        sizes: dict[str, int | None] = {}
        for key, raw in index["entries"].items():
            try:
                loc = self._parse_entry(key, raw)
            except (ValueError, TypeError, KeyError) as err:
                self._lost(key, f"malformed index entry ({err})")
                continue
            if loc.file not in sizes:
                try:
                    sizes[loc.file] = (self.folder / loc.file).stat().st_size
                except OSError:
                    sizes[loc.file] = None
            size = sizes[loc.file]
            if size is None:
                self._lost(key, f"file {loc.file} is missing")
                continue
            if max(end for _, end in loc.offsets.values()) > size:
                self._lost(key, f"file {loc.file} is truncated ({size} bytes)")
                continue
            self._entries[key] = _Entry(None, _nbytes(loc.shapes, loc.dtypes), loc)
            stats = self._files.setdefault(loc.file, {"bytes": size, "live": 0})
            stats["live"] += 1
        numbers = [int(m.group(1)) for f in self._list_files() if (m := self._data_re.fullmatch(f))]
        next_file = index.get("next_file", 0)
        self._next_file = max([next_file if isinstance(next_file, int) else 0, *(n + 1 for n in numbers)])

    def _parse_entry(self, key: Any, raw: Any) -> _Loc:
        validate_key(key)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        file, sha = raw["file"], raw["sha256"]
        shapes, dtypes, offsets = raw["shapes"], raw["dtypes"], raw["offsets"]
        if not isinstance(file, str) or self._data_re.fullmatch(file) is None:
            raise ValueError(f"bad file name {file!r}")
        if not isinstance(sha, str) or _SHA_RE.fullmatch(sha) is None:
            raise ValueError("bad sha256")
        if not (isinstance(shapes, dict) and isinstance(dtypes, dict) and isinstance(offsets, dict)):
            raise ValueError("shapes, dtypes and offsets must be objects")
        if not shapes or set(shapes) != set(dtypes) or set(shapes) != set(offsets):
            raise ValueError("shapes, dtypes and offsets must name the same tensors")
        ranges: dict[str, tuple[int, int]] = {}
        for tname in shapes:
            shape, dtype, rng = shapes[tname], dtypes[tname], offsets[tname]
            if _TENSOR_NAME_RE.fullmatch(tname) is None:
                raise ValueError(f"bad tensor name {tname!r}")
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"bad shape for {tname!r}")
            if dtype not in DTYPES:
                raise ValueError(f"unsupported dtype {dtype!r}")
            if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
                raise ValueError(f"bad offsets for {tname!r}")
            start, end = rng
            if start < 0 or end - start != math.prod(shape) * DTYPES[dtype].itemsize:
                raise ValueError(f"offsets of {tname!r} do not match its shape and dtype")
            ranges[tname] = (start, end)
        return _Loc(file, ranges, sha, shapes, dtypes)

    # ---- files ---------------------------------------------------------------------------------
    def _list_files(self) -> list[str]:
        try:
            return [p.name for p in self.folder.iterdir() if p.is_file()]
        except OSError:
            return []

    def _remove_files(self, keep: set[str], *, index_too: bool) -> int:
        """Remove this store's temporaries and data files not in ``keep`` (and its index if ``index_too``)."""
        removed = 0
        for fname in self._list_files():
            if (
                self._tmp_re.fullmatch(fname)
                or (self._data_re.fullmatch(fname) and fname not in keep)
                or (index_too and fname == self.index_path.name)
            ):
                try:
                    (self.folder / fname).unlink()
                    removed += 1
                except OSError as err:
                    log.warning("cache %s: could not remove %s: %s", self.name, fname, err)
        return removed

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _write_chunk(self, items: list[tuple[str, _Entry]]) -> None:
        """Write one spill file holding ``items`` (all in memory) and give each entry its location."""
        fname = f"{self.name}-{self._next_file:06d}.safetensors"
        self._next_file += 1
        path, tmp = self.folder / fname, self.folder / f"{fname}.tmp"
        tensors = {f"{slot}.{tname}": t for slot, (_, e) in enumerate(items) for tname, t in e.tensors.items()}
        shas = [entry_digest(key, e.tensors) for key, e in items]
        try:
            safetensors.torch.save_file(
                tensors, str(tmp), metadata={"format": FORMAT, "keys": json.dumps([k for k, _ in items])}
            )
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
                head = f.read(8)
                if len(head) != 8:
                    raise OSError(f"{tmp} is too short")
                header_len = int.from_bytes(head, "little")
                header = json.loads(f.read(header_len))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._fsync_dir()
        base = 8 + header_len
        for slot, ((_, e), sha) in enumerate(zip(items, shas)):
            offsets = {}
            for tname in e.tensors:
                start, end = header[f"{slot}.{tname}"]["data_offsets"]
                offsets[tname] = (base + start, base + end)
            e.loc = _Loc(
                file=fname,
                offsets=offsets,
                sha256=sha,
                shapes={n: list(t.shape) for n, t in e.tensors.items()},
                dtypes={n: _dtype_name(t.dtype) for n, t in e.tensors.items()},
            )
        self._files[fname] = {"bytes": path.stat().st_size, "live": len(items)}
        self.files_written += 1

    def _write_entries(self, items: list[tuple[str, _Entry]], *, raise_errors: bool) -> None:
        """Write in-memory entries without a location to disk, in chunks of at most ``max_file_mb``."""
        chunks: list[list[tuple[str, _Entry]]] = []
        size = 0
        for item in items:
            if not chunks or (self._max_file_bytes is not None and size + item[1].nbytes > self._max_file_bytes
                              and chunks[-1]):
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += item[1].nbytes
        for chunk in chunks:
            try:
                self._write_chunk(chunk)
            except Exception as err:
                if raise_errors:
                    raise
                # The memory bound holds; the samples become misses and the device resends them.
                log.error("cache %s: could not spill %d entries to %s (%s: %s); dropping them",
                          self.name, len(chunk), self.folder, type(err).__name__, err)
                for key, e in chunk:
                    if self._entries.get(key) is e:
                        del self._entries[key]
                    if e.tensors is not None:
                        e.tensors = None
                        self._mem_bytes -= e.nbytes

    def _read_file(self, fname: str, items: list[tuple[str, _Entry]]) -> dict[str, dict[str, torch.Tensor]]:
        """Read and verify ``items`` from ``fname``; entries that fail are dropped (and logged)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        try:
            f = open(self.folder / fname, "rb")
        except OSError as err:
            for key, _ in items:
                self._drop_bad(key, f"cannot open {fname}: {err}")
            return out
        with f:
            for key, e in items:
                loc = e.loc
                try:
                    tensors = {}
                    h = hashlib.sha256()
                    h.update(key.encode() + b"\n")
                    for tname in sorted(loc.offsets):
                        start, end = loc.offsets[tname]
                        dtype, shape = DTYPES[loc.dtypes[tname]], loc.shapes[tname]
                        buf = bytearray(end - start)
                        f.seek(start)
                        got = f.readinto(buf) if buf else 0
                        if got != len(buf):
                            raise ValueError(f"{fname} is truncated (read {got} of {len(buf)} bytes of {tname})")
                        h.update(f"{tname}|{loc.dtypes[tname]}|{list(shape)}\n".encode())
                        h.update(buf)
                        if buf:
                            tensors[tname] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
                        else:
                            tensors[tname] = torch.empty(shape, dtype=dtype)
                    if h.hexdigest() != loc.sha256:
                        raise ValueError(f"checksum mismatch in {fname}")
                except (OSError, ValueError, RuntimeError) as err:
                    self._drop_bad(key, str(err))
                    continue
                out[key] = tensors
        return out

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _lost(self, key: Any, why: str) -> None:
        self.corrupt += 1
        log.warning("cache %s: entry %r is lost: %s; it will count as missing", self.name, key, why)

    def _drop_bad(self, key: str, why: str) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self._forget(key, e)
        self._lost(key, why)

    def _forget(self, key: str, e: _Entry) -> None:
        """Release what a removed or replaced entry held (memory, its share of a file)."""
        if e.tensors is not None:
            self._lru.pop(key, None)
            self._mem_bytes -= e.nbytes
            e.tensors = None
        if e.loc is not None:
            stats = self._files.get(e.loc.file)
            if stats is not None:
                stats["live"] -= 1
                if stats["live"] <= 0:
                    self._dead_files.add(e.loc.file)
            e.loc = None

    def _enforce_bound(self) -> None:
        if self._limit is None or (self._mem_bytes <= self._limit and (self._limit > 0 or not self._lru)):
            return
        target = int(self._limit * self.LOW_WATER)
        to_write: list[tuple[str, _Entry]] = []
        pending = 0
        while self._lru and (self._mem_bytes - pending > target or self._limit == 0):
            key, _ = self._lru.popitem(last=False)
            e = self._entries[key]
            if e.loc is None:
                to_write.append((key, e))
                pending += e.nbytes
            else:  # already on disk (flushed, or read back): just let go of the tensors
                e.tensors = None
                self._mem_bytes -= e.nbytes
        if to_write:
            self._write_entries(to_write, raise_errors=False)
            for _, e in to_write:
                if e.tensors is not None:
                    e.tensors = None
                    self._mem_bytes -= e.nbytes

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"cache {self.name} is closed")

    # ---- public API ----------------------------------------------------------------------------
    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store one sample (tensors of any supported dtype, copied to CPU as given); replaces ``key`` if present."""
        validate_key(key)
        stored = {name: _own(name, t) for name, t in _check_tensors(tensors).items()}
        with self._lock:
            self._check_open()
            self._insert(key, stored)
            self._enforce_bound()

    def put_many(self, keys: list[str], tensors: dict[str, torch.Tensor],
                 rows_per_key: list[int] | None = None) -> bool:
        """Store ``len(keys)`` samples: row ``i`` of every tensor is sample ``keys[i]`` (a later duplicate wins);
        with ``rows_per_key``, sample ``i`` is the next ``rows_per_key[i]`` rows of every tensor instead (packed
        samples of several tokens), stored with a ``rows`` entry ``[n]`` so that :meth:`get_many` with
        ``join="cat"`` gives back the row counts as well.

        Returns False, storing nothing, when the samples would take the store past :attr:`quota_bytes`."""
        keys = list(keys)
        for key in keys:
            validate_key(key)
        tensors = _check_tensors(tensors)
        if rows_per_key is not None and (len(rows_per_key) != len(keys) or any(n < 1 for n in rows_per_key)):
            raise ValueError(f"rows_per_key must give each of the {len(keys)} keys at least one row")
        total = len(keys) if rows_per_key is None else sum(rows_per_key)
        for name, t in tensors.items():
            if t.ndim < 1 or t.shape[0] != total:
                raise ValueError(f"tensor {name!r} has shape {list(t.shape)}; its leading dim must be {total}")
        rows = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if rows_per_key is None:
            samples = [{name: t[i].clone() for name, t in rows.items()} for i in range(len(keys))]
        else:
            parts = {name: t.split(list(rows_per_key)) for name, t in rows.items()}
            samples = [{**{name: parts[name][i].clone() for name in rows},
                        "rows": torch.tensor([n], dtype=torch.int64)} for i, n in enumerate(rows_per_key)]
        with self._lock:
            self._check_open()
            if self.quota_bytes is not None:
                new = sum(t.numel() * t.element_size() for sample in samples for t in sample.values())
                replaced = set(keys)
                held = sum(e.nbytes for k, e in self._entries.items() if k not in replaced)
                if held + new > self.quota_bytes:
                    return False
            for key, sample in zip(keys, samples):
                self._insert(key, sample)
            self._enforce_bound()
        return True

    def _insert(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._forget(key, old)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._entries[key] = _Entry(tensors, nbytes)
        self._lru[key] = None
        self._lru.move_to_end(key)
        self._mem_bytes += nbytes

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """One sample's tensors (as put, no batch dim), or None if it is missing."""
        found, _ = self._lookup([key])
        return None if key not in found else {n: t.clone() for n, t in found[key].items()}

    def get_many(
        self, keys: list[str], join: Literal["stack", "cat"] = "stack"
    ) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
        """The samples ``keys`` joined in the given order, and the keys that are missing.

        Returns ``(tensors, [])`` when every key is cached: ``join="stack"`` stacks the samples on a new
        leading dim (the inverse of :meth:`put_many`), ``join="cat"`` concatenates them along dim 0 (for
        samples of different lengths, packed). If any key is missing (never cached, or lost to a bad file),
        returns ``(None, missing)`` with each missing key once, so the caller can ask the device to resend
        those samples. Raises ValueError for an invalid key or samples that do not join (different tensor
        names, or shapes that do not stack).
        """
        if join not in ("stack", "cat"):
            raise ValueError(f"join must be 'stack' or 'cat', got {join!r}")
        keys = list(keys)
        for key in keys:
            validate_key(key)
        found, missing = self._lookup(keys)
        if missing:
            return None, missing
        if not keys:
            return {}, []
        names = set(found[keys[0]])
        for key in keys:
            if set(found[key]) != names:
                raise ValueError(f"cached samples hold different tensors ({sorted(names)} vs {sorted(found[key])})")
        op = torch.stack if join == "stack" else torch.cat
        try:
            return {name: op([found[k][name] for k in keys]) for name in sorted(names)}, []
        except RuntimeError as err:
            raise ValueError(f"cached samples do not {join}: {err}") from None

    def _lookup(self, keys: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
        with self._lock:
            self._check_open()
            found: dict[str, dict[str, torch.Tensor]] = {}
            to_read: dict[str, list[tuple[str, _Entry]]] = {}
            for key in dict.fromkeys(keys):
                e = self._entries.get(key)
                if e is None:
                    continue
                if e.tensors is not None:
                    found[key] = e.tensors
                    self._lru.move_to_end(key)
                else:
                    to_read.setdefault(e.loc.file, []).append((key, e))
            for fname, items in to_read.items():
                loaded = self._read_file(fname, items)
                for key, e in items:
                    if key in loaded:  # keep it in memory (it stays on disk too, so evicting it is free)
                        e.tensors = loaded[key]
                        self._lru[key] = None
                        self._mem_bytes += e.nbytes
                        found[key] = e.tensors
            n_found = sum(1 for k in keys if k in found)
            self.hits += n_found
            self.misses += len(keys) - n_found
            missing = [k for k in dict.fromkeys(keys) if k not in found]
            self._enforce_bound()
            return found, missing

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return isinstance(key, str) and key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    @property
    def bytes_in_memory(self) -> int:
        with self._lock:
            return self._mem_bytes

    @property
    def bytes_on_disk(self) -> int:
        with self._lock:
            return sum(s["bytes"] for s in self._files.values())

    def stats(self) -> dict[str, float]:
        """Counters to log: ``cache/hits``, ``cache/misses``, ``cache/bytes`` (memory + disk) and more."""
        with self._lock:
            mem, disk = self._mem_bytes, sum(s["bytes"] for s in self._files.values())
            return {
                "cache/hits": self.hits,
                "cache/misses": self.misses,
                "cache/bytes": mem + disk,
                "cache/bytes_in_memory": mem,
                "cache/bytes_on_disk": disk,
                "cache/entries": len(self._entries),
                "cache/corrupt": self.corrupt,
            }

    def flush(self) -> None:
        """Write every in-memory entry not yet on disk (they stay in memory too), then the index, atomically."""
        with self._lock:
            self._check_open()
            pending = [(k, e) for k, e in self._entries.items() if e.loc is None and e.tensors is not None]
            if pending:
                self._write_entries(pending, raise_errors=True)
            self._write_index()

    def _write_index(self) -> None:
        data = json.dumps(self._index_unlocked(), separators=(",", ":")).encode()
        tmp = self.folder / f"{self.index_path.name}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._fsync_dir()
        # Files no entry uses any more are deleted only now, once no index on disk refers to them.
        for fname in sorted(self._dead_files):
            stats = self._files.get(fname)
            if stats is not None and stats["live"] > 0:
                continue
            try:
                (self.folder / fname).unlink(missing_ok=True)
            except OSError as err:
                log.warning("cache %s: could not remove %s: %s", self.name, fname, err)
                continue
            self._files.pop(fname, None)
        self._dead_files.clear()

    def index(self) -> dict:
        """The JSON-able index of the entries on disk (what :meth:`open` would restore; call :meth:`flush` first
        to include the in-memory ones): ``{"format", "version", "name", "next_file", "entries": {key: {"file",
        "offsets": {tensor: [start, end]}, "sha256", "shapes", "dtypes"}}, "files": {file: {"bytes", "live"}}}``.
        """
        with self._lock:
            return self._index_unlocked()

    def _index_unlocked(self) -> dict:
        entries = {k: e.loc.to_json() for k, e in self._entries.items() if e.loc is not None}
        files = {f: dict(s) for f, s in self._files.items() if s["live"] > 0}
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "next_file": self._next_file,
            "entries": entries,
            "files": files,
        }

    def close(self) -> None:
        """Flush, then release the memory. Idempotent; the store cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            for e in self._entries.values():
                e.tensors = None
            self._lru.clear()
            self._mem_bytes = 0
            self._closed = True

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.folder)!r}, name={self.name!r}, entries={len(self._entries)}, "
                f"memory={self._mem_bytes}B/{self._limit}B, disk={self.bytes_on_disk}B)")


# ---- helpers ---------------------------------------------------------------------------------------
def _nbytes(shapes: dict[str, list[int]], dtypes: dict[str, str]) -> int:
    return sum(math.prod(shapes[n]) * DTYPES[dtypes[n]].itemsize for n in shapes)


def _check_tensors(tensors: Any) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("a sample needs a non-empty dict of tensors")
    for name, t in tensors.items():
        if not isinstance(name, str) or _TENSOR_NAME_RE.fullmatch(name) is None:
            raise ValueError(f"invalid tensor name {name!r}: 1-128 characters of [A-Za-z0-9_.-]")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{name!r} must be a dense torch.Tensor")
        if _dtype_name(t.dtype) not in DTYPES:
            raise ValueError(f"{name!r} has unsupported dtype {t.dtype}; supported: {sorted(DTYPES)}")
    return tensors


def _own(name: str, t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy the caller cannot change behind the store's back."""
    t = t.detach()
    if t.device.type != "cpu":
        return t.cpu().contiguous()
    return t.clone(memory_format=torch.contiguous_format)
