"""The server's activation store: exact round trips, LRU spill under a memory bound, restart, bad files."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import pytest
import torch

from lightning_mobillm.server.cache import ActivationStore, entry_digest

L, D, K = 4, 16, 3  # tapped layers, width, outputs


def _key(i: int) -> str:
    return f"{i:032x}"


def _sample(i: int, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    acts = torch.randn(1, L, D, generator=g) * 4
    if dtype in (torch.int8, torch.uint8, torch.int32, torch.int64):
        acts = torch.randint(0, 100, (1, L, D), generator=g).to(dtype)
    elif dtype == torch.bool:
        acts = acts > 0
    else:
        acts = acts.to(dtype)
    return {"acts": acts, "target": torch.randn(K, generator=g)}


def _batch(ids: list[int], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    samples = [_sample(i, dtype) for i in ids]
    return {n: torch.stack([s[n] for s in samples]) for n in samples[0]}


def _sample_bytes() -> int:
    return sum(t.numel() * t.element_size() for t in _sample(0).values())


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and torch.equal(a[n], b[n]) for n in a
    )


def _spilled_store(folder: Path, n: int = 12, per_file: int = 4) -> ActivationStore:
    """A flushed store whose ``n`` samples sit in files of ``per_file`` samples each (nothing in memory)."""
    store = ActivationStore(folder, memory_limit_mb=0, max_file_mb=per_file * _sample_bytes() / 2**20)
    for start in range(0, n, per_file):
        ids = list(range(start, min(n, start + per_file)))
        store.put_many([_key(i) for i in ids], _batch(ids))
    store.flush()
    assert store.bytes_in_memory == 0
    return store


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int64, torch.bool]
)
@pytest.mark.parametrize("limit", [math.inf, 0])
def test_round_trip_exact(tmp_path: Path, dtype: torch.dtype, limit: float) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=limit)
    for i in range(5):
        store.put(_key(i), _sample(i, dtype))
    out, missing = store.get_many([_key(i) for i in range(5)])
    assert missing == []
    assert _equal(out, _batch(list(range(5)), dtype))
    assert out["acts"].shape == (5, 1, L, D) and out["target"].shape == (5, K)
    assert _equal(store.get(_key(3)), _sample(3, dtype))


def test_put_many_get_many_order_and_copy(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path)
    batch = _batch(list(range(8)))
    store.put_many([_key(i) for i in range(8)], batch)
    batch["acts"].zero_()  # the store keeps its own copy
    order = [5, 0, 7, 2, 2]
    out, missing = store.get_many([_key(i) for i in order])
    assert missing == []
    assert _equal(out, _batch(order))
    out["target"].zero_()  # and hands out copies
    assert _equal(store.get_many([_key(5)])[0], _batch([5]))
    assert len(store) == 8 and set(store.keys()) == {_key(i) for i in range(8)}
    assert _key(1) in store and _key(9) not in store and "../x" not in store


def test_missing_keys_and_counters(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path)
    store.put_many([_key(i) for i in range(4)], _batch(list(range(4))))
    out, missing = store.get_many([_key(0), _key(10), _key(1), _key(11), _key(10)])
    assert out is None
    assert missing == [_key(10), _key(11)]
    assert (store.hits, store.misses) == (2, 3)
    out, missing = store.get_many([_key(2), _key(3)])
    assert missing == [] and out is not None
    assert (store.hits, store.misses) == (4, 3)
    stats = store.stats()
    assert stats["cache/hits"] == 4 and stats["cache/misses"] == 3
    assert stats["cache/bytes"] == store.bytes_in_memory + store.bytes_on_disk == 4 * _sample_bytes()


def test_overwrite_replaces(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=0)
    store.put(_key(0), _sample(0))
    store.put(_key(0), _sample(1))
    assert len(store) == 1
    assert _equal(store.get(_key(0)), _sample(1))
    store.flush()  # the file holding the replaced version is no longer needed
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


@pytest.mark.parametrize("bad", ["../x", "", "a/b", "x" * 200, "a b", "a.b", "ключ", "a\n", None, 7])
def test_bad_keys_rejected(tmp_path: Path, bad: object) -> None:
    store = ActivationStore(tmp_path)
    with pytest.raises(ValueError):
        store.put(bad, _sample(0))
    with pytest.raises(ValueError):
        store.put_many([_key(0), bad], _batch([0, 1]))
    with pytest.raises(ValueError):
        store.get_many([bad])
    assert len(store) == 0  # a bad key in a batch stores nothing
    assert store.get_many([_key(0)]) == (None, [_key(0)])
    assert "x" * 128 not in store
    store.put("A-z_09" + "x" * 122, _sample(0))  # 128 chars of the allowed alphabet is fine


def test_bad_tensors_rejected(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path)
    with pytest.raises(ValueError):
        store.put(_key(0), {})
    with pytest.raises(ValueError):
        store.put(_key(0), {"../acts": torch.zeros(2)})
    with pytest.raises(ValueError):
        store.put(_key(0), {"acts": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError):
        store.put_many([_key(0), _key(1)], {"acts": torch.zeros(3, 2)})
    with pytest.raises(ValueError):
        ActivationStore(tmp_path, name="../evil")


def test_lru_spill_keeps_bound_and_data(tmp_path: Path) -> None:
    per = _sample_bytes()
    limit_mb = 10.5 * per / 2**20  # room for 10 samples
    store = ActivationStore(tmp_path, memory_limit_mb=limit_mb)
    for start in range(0, 40, 4):
        ids = list(range(start, start + 4))
        store.put_many([_key(i) for i in ids], _batch(ids))
        assert store.bytes_in_memory <= limit_mb * 2**20
    assert len(store) == 40
    assert store.bytes_on_disk > 0 and store.files_written >= 2
    # The most recent samples are still in memory, the oldest were spilled; all read back exactly.
    assert store._entries[_key(39)].tensors is not None and store._entries[_key(0)].tensors is None
    order = list(range(39, -1, -3))
    out, missing = store.get_many([_key(i) for i in order])
    assert missing == [] and _equal(out, _batch(order))
    assert store.bytes_in_memory <= limit_mb * 2**20
    # Touching a key makes it recent: it survives the next spill.
    store.get_many([_key(1)])
    store.put_many([_key(i) for i in range(100, 104)], _batch(list(range(100, 104))))
    assert store._entries[_key(1)].tensors is not None


def test_memory_limit_zero_writes_at_once(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=0)
    store.put_many([_key(i) for i in range(6)], _batch(list(range(6))))
    assert store.bytes_in_memory == 0 and store.bytes_on_disk > 6 * _sample_bytes()
    assert store.files_written == 1  # one batch, one file
    out, missing = store.get_many([_key(i) for i in range(6)])
    assert missing == [] and _equal(out, _batch(list(range(6))))
    assert store.bytes_in_memory == 0
    index = store.index()
    assert set(index["entries"]) == {_key(i) for i in range(6)}
    assert index["entries"][_key(0)]["shapes"] == {"acts": [1, L, D], "target": [K]}
    assert index["entries"][_key(0)]["dtypes"] == {"acts": "float16", "target": "float32"}
    assert index["entries"][_key(0)]["sha256"] == entry_digest(_key(0), _sample(0))
    json.dumps(index)


def test_large_limit_never_spills_until_flush(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=1e9)
    store.put_many([_key(i) for i in range(20)], _batch(list(range(20))))
    assert store.bytes_on_disk == 0 and not list(tmp_path.glob("*.safetensors"))
    store.flush()
    assert store.bytes_on_disk > 0 and store.bytes_in_memory == 20 * _sample_bytes()  # kept in memory too
    assert (tmp_path / "cache.index.json").exists()


def test_flush_and_reopen(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=8 * _sample_bytes() / 2**20)
    store.put_many([_key(i) for i in range(20)], _batch(list(range(20))))
    store.put(_key(50), {"acts": torch.arange(6, dtype=torch.int8).reshape(1, 2, 3), "target": torch.ones(K)})
    store.flush()
    store.put(_key(99), _sample(99))  # after the last flush: not part of the checkpoint
    store.close()
    with pytest.raises(RuntimeError):
        store.get_many([_key(0)])

    again = ActivationStore.open(tmp_path)
    assert len(again) == 22 and again.bytes_in_memory == 0
    out, missing = again.get_many([_key(i) for i in range(20)])
    assert missing == [] and _equal(out, _batch(list(range(20))))
    assert _equal(again.get(_key(50)), {"acts": torch.arange(6, dtype=torch.int8).reshape(1, 2, 3),
                                       "target": torch.ones(K)})
    assert again.corrupt == 0
    # An index kept elsewhere (e.g. in a checkpoint) opens the same way.
    index = again.index()
    again.close()
    third = ActivationStore.open(tmp_path, index=index)
    assert _equal(third.get(_key(7)), _sample(7))


def test_reopen_after_crash_drops_unflushed_and_orphans(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=0)
    store.put_many([_key(i) for i in range(4)], _batch(list(range(4))))
    store.flush()
    store.put_many([_key(i) for i in range(4, 8)], _batch(list(range(4, 8))))  # spilled, never indexed
    (tmp_path / "cache-000009.safetensors.tmp").write_bytes(b"half a write")
    del store  # crash: no close
    again = ActivationStore.open(tmp_path, memory_limit_mb=0)
    assert sorted(again.keys()) == [_key(i) for i in range(4)]
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob("*.tmp"))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # the orphan spill file was removed
    again.put_many([_key(i) for i in range(4, 8)], _batch(list(range(4, 8))))
    out, missing = again.get_many([_key(i) for i in range(8)])
    assert missing == [] and _equal(out, _batch(list(range(8))))


def test_open_empty_folder_and_fresh_store_wipes(tmp_path: Path) -> None:
    assert len(ActivationStore.open(tmp_path / "none")) == 0
    tmp_path = tmp_path / "store"
    _spilled_store(tmp_path).close()
    fresh = ActivationStore(tmp_path)
    assert len(fresh) == 0 and not list(tmp_path.iterdir())
    other = ActivationStore(tmp_path, name="other", memory_limit_mb=0)
    other.put(_key(1), _sample(1))
    other.flush()
    ActivationStore(tmp_path, name="cache")  # does not touch another store's files
    assert len(ActivationStore.open(tmp_path, name="other")) == 1


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _file_of(store: ActivationStore, key: str) -> tuple[Path, dict]:
    entry = store.index()["entries"][key]
    return store.folder / entry["file"], entry


@pytest.mark.parametrize(
    ("damage", "reopen"),
    [(d, r) for d in ("flip", "truncate", "delete") for r in (False, True)]
    + [("index_sha", True), ("index_garbage", True)],
)
def test_damage_is_detected(tmp_path: Path, damage: str, reopen: bool, caplog: pytest.LogCaptureFixture) -> None:
    store = _spilled_store(tmp_path, n=12, per_file=4)  # keys 0-3, 4-7, 8-11 in three files
    victim = _key(5)
    path, entry = _file_of(store, victim)
    start, end = entry["offsets"]["acts"]
    if damage == "flip":
        _flip(path, (start + end) // 2)
        bad = [victim]
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: start + 10])
        bad = [k for k, e in store.index()["entries"].items() if e["file"] == path.name and
               max(r[1] for r in e["offsets"].values()) > start + 10]
    elif damage == "delete":
        path.unlink()
        bad = [_key(i) for i in range(4, 8)]
    if damage in ("index_sha", "index_garbage"):  # the index is only read by open()
        store.close()
        index_path = tmp_path / "cache.index.json"
        index = json.loads(index_path.read_text())
        if damage == "index_sha":
            sha = index["entries"][victim]["sha256"]
            index["entries"][victim]["sha256"] = ("0" if sha[0] != "0" else "1") + sha[1:]
        else:
            index["entries"][victim]["shapes"]["acts"] = "../../etc/passwd"
            index["entries"][_key(6)]["file"] = "../cache-000001.safetensors"
        index_path.write_text(json.dumps(index))
        bad = [victim] if damage == "index_sha" else [victim, _key(6)]
    if reopen:
        store.close()
        store = ActivationStore.open(tmp_path, memory_limit_mb=0)
    assert bad
    keys = [_key(i) for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="lightning_mobillm.server.cache"):
        out, missing = store.get_many(keys)
    assert out is None and missing == bad
    assert store.corrupt == len(bad)
    assert any("lost" in r.getMessage() for r in caplog.records)
    good = [k for k in keys if k not in bad]
    out, missing = store.get_many(good)
    assert missing == [] and _equal(out, _batch([int(k, 16) for k in good]))
    # The device resends the lost samples; the store serves them again.
    store.put_many(bad, _batch([int(k, 16) for k in bad]))
    out, missing = store.get_many(keys)
    assert missing == [] and _equal(out, _batch(list(range(12))))


def test_unreadable_index_opens_empty(tmp_path: Path) -> None:
    _spilled_store(tmp_path).close()
    (tmp_path / "cache.index.json").write_text("{not json")
    store = ActivationStore.open(tmp_path)
    assert len(store) == 0
    assert store.get_many([_key(0)]) == (None, [_key(0)])


def test_cat_join_for_packed_samples(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=0)
    store.put(_key(0), {"acts": torch.ones(3, L, D), "lengths": torch.tensor([3])})
    store.put(_key(1), {"acts": torch.zeros(5, L, D), "lengths": torch.tensor([5])})
    out, _ = store.get_many([_key(0), _key(1)], join="cat")
    assert out["acts"].shape == (8, L, D) and out["lengths"].tolist() == [3, 5]
    with pytest.raises(ValueError):
        store.get_many([_key(0), _key(1)])  # different shapes do not stack


def test_threads(tmp_path: Path) -> None:
    store = ActivationStore(tmp_path, memory_limit_mb=6 * _sample_bytes() / 2**20)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for j in range(10):
                ids = [t * 100 + j * 2, t * 100 + j * 2 + 1]
                store.put_many([_key(i) for i in ids], _batch(ids))
                out, missing = store.get_many([_key(i) for i in ids])
                assert missing == [] and _equal(out, _batch(ids))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(store) == 80 and store.bytes_in_memory <= 6 * _sample_bytes()
