"""BIG-bench tasks from the ``bigbench==1.0.0`` source archive, read offline.

BIG-bench ships its 1000-odd tasks as ``task.json`` files inside the ``bigbench`` source distribution on
PyPI. Installing that package pulls a large, pinned dependency tree, so it is never installed: the archive
is downloaded once with ``pip download`` (the package registry is the only network this needs), and only
the ``task.json`` of a task that is asked for is copied out of it into :func:`bigbench_dir` in the cache.
Nothing of BIG-bench goes into a repository (every task carries a canary string asking that it never
appear in training corpora; a cache is not a corpus, a commit would be).

The archive is a 358 MB gzip stream with no index, so finding one task costs one pass over it (about 10 s
here); the first pass also writes the list of every task it saw (``tasks.json``), so a misspelt name gets
suggestions without another pass.

* :func:`task_json` returns the cached ``task.json`` of a task (``multiemo/all_text_en``: subtasks are
  ``<task>/<subtask>``), fetching and extracting it on first use.
* :func:`load_task` returns the parsed JSON; :func:`classification_records` turns a multiple-choice task
  with one fixed set of choices into ``(records, class_names)`` for
  :class:`~lightning_mobillm.data.TextClassificationDataModule` (``dataset: bigbench:<task>``).
* ``python -m lightning_mobillm.data.bigbench <task> ...`` fetches tasks ahead of time and prints their
  paths and sizes.

The generative tasks (``target`` strings instead of ``target_scores``) are read by :func:`load_task` as
well; what to make of them is the generative data module's business.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_mobillm.assets import AssetError, _file_lock, cache_dir

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
#: where the tasks sit inside the archive: ``bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json``
_TASKS_IN_ARCHIVE = "bigbench/benchmark_tasks/"
_TASK_NAME = re.compile(r"^[A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)*$")
#: a classification task with more distinct choices than this is a multiple-choice task with free answers
MAX_CLASSES = 64
#: the largest task.json copied out of the archive (the largest in 1.0.0 is about 120 MB)
MAX_TASK_BYTES = 512 << 20


def bigbench_dir() -> Path:
    """``<cache>/bigbench/1.0.0``: the archive, ``tasks.json`` (the task list) and ``tasks/<task>/task.json``."""
    return cache_dir() / "bigbench" / "1.0.0"


def download_command(dest: Path) -> list[str]:
    """The pip command that fetches the archive into ``dest`` (no install, no dependencies)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", BIGBENCH_REQUIREMENT, "-d", str(dest)]


def archive_path(download: bool = True) -> Path:
    """The source archive, downloaded with :func:`download_command` when missing and ``download`` is true.

    Raises:
        AssetError: it is missing and may not be downloaded, or pip failed (the message has the command).
    """
    root = bigbench_dir()
    path = root / ARCHIVE_NAME
    if path.is_file():
        return path
    command = download_command(root)
    hint = "python " + " ".join(command[1:])
    if not download:
        raise AssetError(f"the BIG-bench archive is not in the cache ({path}); fetch it with: {hint}")
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".download.lock"):
        if path.is_file():  # another process fetched it while this one waited
            return path
        print(f"lightning_mobillm: fetching {BIGBENCH_REQUIREMENT}'s source archive (358 MB) into {root}",
              file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise AssetError(f"could not fetch the BIG-bench archive ({'; '.join(tail)}); "
                             f"run it by hand: {hint}")
    return path


def _check_name(task: str) -> str:
    if not isinstance(task, str) or not _TASK_NAME.match(task):
        raise ValueError(f"a BIG-bench task name is words joined by '/' (e.g. 'multiemo/all_text_en'), "
                         f"got {task!r}")
    return task


def _task_of(member: str) -> str | None:
    """The task a member of the archive is the ``task.json`` of, else None."""
    head, sep, rest = member.partition(_TASKS_IN_ARCHIVE)
    if not sep or "/" in head.rstrip("/") or not rest.endswith("/task.json"):
        return None
    task = rest[: -len("/task.json")]
    return task if _TASK_NAME.match(task) else None


def known_tasks() -> list[str] | None:
    """Every task of the archive (sorted), once a pass over it has listed them, else None."""
    index = bigbench_dir() / "tasks.json"
    return json.loads(index.read_text()) if index.is_file() else None


def _scan(archive: Path, task: str | None) -> Path | None:
    """One streaming pass over ``archive``: writes the task list and copies ``task``'s ``task.json`` out of it
    (none when ``task`` is None)."""
    root = bigbench_dir()
    target = root / "tasks" / (task or "-") / "task.json"
    seen: list[str] = []
    found = False
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                name = _task_of(member.name)
                if name is None:
                    continue
                seen.append(name)
                if name != task or found:
                    continue
                if not member.isfile() or member.size > MAX_TASK_BYTES:
                    raise AssetError(f"{archive}: {member.name} is not a regular file under {MAX_TASK_BYTES} bytes")
                source = tar.extractfile(member)
                assert source is not None
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".json.partial")
                with partial.open("wb") as f:  # read the bytes ourselves: no path from the archive is trusted
                    while chunk := source.read(1 << 20):
                        f.write(chunk)
                os.replace(partial, target)
                found = True
    except (tarfile.TarError, EOFError, OSError) as err:
        raise AssetError(f"the BIG-bench archive {archive} is unreadable ({err}); delete it to fetch it again") \
            from err
    index = root / "tasks.json"
    partial_index = index.with_suffix(".json.partial")
    partial_index.write_text(json.dumps(sorted(set(seen))))
    os.replace(partial_index, index)
    if task is None:
        return None
    if not found:
        raise _unknown(task, sorted(set(seen)))
    return target


def _unknown(task: str, tasks: Sequence[str]) -> ValueError:
    subtasks = [t for t in tasks if t.startswith(task + "/")]
    if subtasks:
        more = f"; its subtasks: {', '.join(subtasks[:12])}{' ...' if len(subtasks) > 12 else ''}"
    else:
        close = difflib.get_close_matches(task, tasks, n=5)
        more = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"BIG-bench 1.0.0 has no task {task!r}{more}")


def task_json(task: str, download: bool = True) -> Path:
    """The cached ``task.json`` of ``task``, extracted from the archive on first use.

    Args:
        task: the task's folder under ``benchmark_tasks``, subtasks as ``<task>/<subtask>``.
        download: fetch the archive with pip when it is not in the cache.

    Raises:
        ValueError: a malformed name, or a task the archive does not have (with suggestions).
        AssetError: the archive is missing (``download=False``), cannot be fetched or is unreadable.
    """
    _check_name(task)
    target = bigbench_dir() / "tasks" / task / "task.json"
    if target.is_file():
        return target
    tasks = known_tasks()
    if tasks is not None and task not in tasks:
        raise _unknown(task, tasks)
    archive = archive_path(download)
    with _file_lock(bigbench_dir() / ".extract.lock"):
        if target.is_file():
            return target
        path = _scan(archive, task)
        assert path is not None
        return path


def list_tasks(download: bool = True) -> list[str]:
    """Every task name of the archive, sorted (one pass over it the first time)."""
    tasks = known_tasks()
    if tasks is None:
        archive = archive_path(download)
        with _file_lock(bigbench_dir() / ".extract.lock"):
            _scan(archive, None)
        tasks = known_tasks() or []
    return tasks


def load_task(task: str, download: bool = True) -> dict[str, Any]:
    """The parsed ``task.json`` of ``task`` (see :func:`task_json`)."""
    path = task_json(task, download)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AssetError(f"{path} is not valid JSON ({err}); delete it to extract it again") from err
    if not isinstance(data, dict):
        raise AssetError(f"{path} is not a BIG-bench task (a JSON object)")
    return data


def classification_records(task: str, data: dict[str, Any] | None = None,
                           download: bool = True) -> tuple[list[dict], list[str]]:
    """A multiple-choice task with one fixed set of choices as text-classification records.

    Each example's ``input`` is the text (the task's prefixes and choice lists are left out: the data
    module's ``prompt`` frames the text) and its label the one choice with the highest ``target_scores``.

    Args:
        task: the task name (for :func:`load_task` and the messages).
        data: the parsed task (read with :func:`load_task` when None).
        download: as :func:`task_json`.

    Returns:
        ``(records, class_names)``: records ``{"text": str, "label": int}`` in the task's order, and the
        choices sorted (a stable order on every machine).

    Raises:
        ValueError: the task has no examples (a parent of subtasks), an example has no ``target_scores``,
            its choices differ from the first example's, or it has no single best choice.
    """
    data = load_task(task, download) if data is None else data
    examples = data.get("examples")
    if not examples:
        tasks = known_tasks() or []
        subtasks = [t for t in tasks if t.startswith(task + "/")]
        hint = f"; pick one of its subtasks: {', '.join(subtasks[:12])}" if subtasks else ""
        raise ValueError(f"BIG-bench task {task!r} has no examples of its own{hint}")
    choices: list[str] | None = None
    records: list[dict] = []
    for i, example in enumerate(examples):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        if not isinstance(scores, dict) or not scores or not isinstance(example.get("input"), str):
            raise ValueError(f"BIG-bench task {task!r}, example {i}: not a multiple-choice example "
                             f"(needs 'input' and 'target_scores'); it is not a classification task")
        if choices is None:
            choices = sorted(scores)
            if len(choices) > MAX_CLASSES:
                raise ValueError(f"BIG-bench task {task!r} has {len(choices)} choices per example, more than "
                                 f"{MAX_CLASSES}: not a classification task")
        elif sorted(scores) != choices:
            raise ValueError(f"BIG-bench task {task!r}, example {i}: its choices {sorted(scores)} differ from "
                             f"the first example's {choices}; only tasks with one fixed set of choices are "
                             f"classification tasks")
        best = max(scores.values())
        winners = [c for c, s in scores.items() if s == best]
        if len(winners) != 1:
            raise ValueError(f"BIG-bench task {task!r}, example {i}: {len(winners)} choices share the best score "
                             f"({sorted(winners)}); a classification example needs exactly one")
        records.append({"text": example["input"], "label": choices.index(winners[0])})
    assert choices is not None
    return records, choices


def generative_records(task: str, data: dict[str, Any] | None = None,
                       download: bool = True) -> list[dict]:
    """A generative task (examples with ``input`` and ``target``) as prompt/answer records.

    Args:
        task: the task name (for :func:`load_task` and the messages).
        data: the parsed task (read with :func:`load_task` when None).
        download: as :func:`task_json`.

    Returns:
        Records ``{"prompt": input, "answer": the first target, "references": every target}`` in the task's
        order (a task may list several acceptable targets; metrics take the best match).

    Raises:
        ValueError: the task has no examples, or an example has no string ``input`` or no non-empty target.
    """
    data = load_task(task, download) if data is None else data
    examples = data.get("examples")
    if not examples:
        raise ValueError(f"BIG-bench task {task!r} has no examples of its own")
    records: list[dict] = []
    for i, example in enumerate(examples):
        target = example.get("target") if isinstance(example, dict) else None
        targets = [target] if isinstance(target, str) else target
        if (not isinstance(example, dict) or not isinstance(example.get("input"), str)
                or not isinstance(targets, list) or not targets
                or not all(isinstance(t, str) and t.strip() for t in targets)):
            raise ValueError(f"BIG-bench task {task!r}, example {i}: not a generative example (needs a string "
                             f"'input' and a non-empty 'target' string or list of strings)")
        records.append({"prompt": example["input"], "answer": targets[0], "references": list(targets)})
    return records


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_mobillm.data.bigbench",
                                description="Fetch BIG-bench 1.0.0 tasks into the cache and print their paths.")
    p.add_argument("tasks", nargs="*", help="task names, subtasks as <task>/<subtask>")
    p.add_argument("--list", action="store_true", help="print every task name the archive has")
    args = p.parse_args(argv)
    for task in args.tasks:
        path = task_json(task)
        print(f"{task}\t{path}\t{path.stat().st_size} bytes")
    if args.list:
        print("\n".join(list_tasks()))


if __name__ == "__main__":
    main()
