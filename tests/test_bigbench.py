"""The BIG-bench source: tasks copied out of a (synthetic) ``bigbench`` source archive into the cache, the
multiple-choice-to-classification conversion, its refusals, and ``dataset: bigbench:<task>`` in the data
module. No real BIG-bench text is used: the archive is built here with made-up tasks."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest

from lightning_mobillm.assets import AssetError
from lightning_mobillm.data import TextClassificationDataModule
from lightning_mobillm.data import bigbench as bb

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
CLASSES = ("sport", "tech", "money")


def _choice_task(n: int = 30) -> dict:
    words = {"sport": "match goal team", "tech": "chip code robot", "money": "bank market tax"}
    examples = []
    for i in range(n):
        label = CLASSES[i % 3]
        examples.append({"input": f"{words[label]} {i}",
                         "target_scores": {c: int(c == label) for c in ("tech", "money", "sport")}})
    return {"name": "toy", "canary": "made up for a test", "task_prefix": "Pick one.", "examples": examples}


def _archive(path, tasks: dict[str, dict], extra: dict[str, bytes] | None = None):
    with tarfile.open(path, "w:gz") as tar:
        members = {f"{ROOT}{name}/task.json": json.dumps(task).encode() for name, task in tasks.items()}
        members |= extra or {}
        members[f"{ROOT}toy/README.md"] = b"not a task"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOBILLM_CACHE", str(tmp_path / "cache"))
    root = bb.bigbench_dir()
    root.mkdir(parents=True)
    tasks = {
        "toy": _choice_task(),
        "parent": {"name": "parent", "description": "subtasks only"},
        "parent/sub_a": _choice_task(9),
        "parent/sub_b": _choice_task(6),
        "free_answers": {"examples": [{"input": "q1", "target_scores": {"a": 1, "b": 0}},
                                      {"input": "q2", "target_scores": {"c": 1, "d": 0}}]},
        "tie": {"examples": [{"input": "q1", "target_scores": {"a": 1, "b": 1}}]},
        "generative": {"examples": [{"input": "q1", "target": "an answer"}]},
    }
    evil = {f"{ROOT}../../escape/task.json": b"{}", "/etc/bigbench/benchmark_tasks/abs/task.json": b"{}"}
    _archive(root / bb.ARCHIVE_NAME, tasks, evil)
    return root


def test_a_task_is_copied_out_once_and_the_archive_is_then_not_needed(cache):
    path = bb.task_json("toy")
    assert path == cache / "tasks" / "toy" / "task.json"
    assert json.loads(path.read_text())["name"] == "toy"
    assert bb.known_tasks() == ["free_answers", "generative", "parent", "parent/sub_a", "parent/sub_b", "tie",
                                "toy"]  # the members that escape benchmark_tasks are not tasks
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("task.json")) == ["tasks/toy/task.json"]
    assert not (cache.parent / "escape").exists()
    (cache / bb.ARCHIVE_NAME).unlink()
    assert bb.task_json("toy", download=False) == path  # served from the cache
    with pytest.raises(AssetError, match="pip download --no-deps bigbench==1.0.0"):
        bb.task_json("parent/sub_a", download=False)  # needs the archive, which is gone


def test_multiple_choice_becomes_classification_with_sorted_classes(cache):
    records, names = bb.classification_records("toy")
    assert names == sorted(CLASSES)
    assert len(records) == 30 and Counter(r["label"] for r in records) == Counter({0: 10, 1: 10, 2: 10})
    assert records[0] == {"text": "match goal team 0", "label": names.index("sport")}
    sub, _ = bb.classification_records("parent/sub_a")
    assert len(sub) == 9


@pytest.mark.parametrize(("task", "message"), [
    ("parent", "no examples of its own; pick one of its subtasks: parent/sub_a, parent/sub_b"),
    ("free_answers", r"example 1: its choices \['c', 'd'\] differ"),
    ("tie", "2 choices share the best score"),
    ("generative", "not a multiple-choice example"),
])
def test_tasks_that_are_not_classification_are_refused_with_the_reason(cache, task, message):
    with pytest.raises(ValueError, match=message):
        bb.classification_records(task)


def test_unknown_and_malformed_names(cache):
    with pytest.raises(ValueError, match="did you mean toy"):
        bb.task_json("toys")  # the first pass lists every task
    with pytest.raises(ValueError, match="did you mean toy"):
        bb.task_json("toyy")  # later ones answer from the list, without a pass
    for bad in ("../escape", "/etc/passwd", "toy/", "a b", ""):
        with pytest.raises(ValueError, match="words joined by '/'"):
            bb.task_json(bad)
    assert bb.list_tasks()[-1] == "toy"


def test_a_corrupt_archive_is_a_clear_error_and_writes_nothing(cache):
    (cache / bb.ARCHIVE_NAME).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(AssetError, match="unreadable.*delete it"):
        bb.task_json("toy")
    assert not list(cache.rglob("task.json"))


def test_a_missing_archive_is_fetched_with_pip(cache, monkeypatch):
    (cache / bb.ARCHIVE_NAME).unlink()
    calls = []

    def fake_run(command, **kwargs):  # stands in for pip: writes the archive where pip would
        calls.append(command)
        _archive(cache / bb.ARCHIVE_NAME, {"toy": _choice_task(3)})

        class Done:
            returncode, stdout, stderr = 0, "", ""
        return Done()

    monkeypatch.setattr(bb.subprocess, "run", fake_run)
    assert len(bb.classification_records("toy")[0]) == 3
    assert calls and calls[0][1:] == ["-m", "pip", "download", "--no-deps", "bigbench==1.0.0", "-d", str(cache)]


def test_the_data_module_reads_bigbench_tasks(cache, word_tokenizer):
    dm = TextClassificationDataModule(dataset="bigbench:toy", prompt="Text: {text}\nTopic:", val_fraction=0.2,
                                      test_fraction=0.2)
    assert dm.class_names == sorted(CLASSES)
    dm.set_tokenizer(word_tokenizer)
    dm.prepare_data()
    dm.setup()
    sizes = [len(dm.split_dataset(s)) for s in ("train", "validation", "test")]
    assert sum(sizes) == 30 and sizes[1] > 0 and sizes[2] > 0
    with pytest.raises(ValueError, match="takes no data_files"):
        TextClassificationDataModule(dataset="bigbench:toy", data_files="x.json").class_names  # noqa: B018
    with pytest.raises(ValueError, match="words joined by '/'"):
        TextClassificationDataModule(dataset="bigbench:../toy").class_names  # noqa: B018
