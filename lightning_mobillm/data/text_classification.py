"""Prompted text classification as a LightningDataModule.

Each example becomes ``prompt.replace("{text}", text)`` tokenized once per ``setup``; the text alone is
truncated so that the prompt's suffix (e.g. ``"\\nTopic:"``) always survives. Batches are dicts of
``input_ids`` [B, T], ``attention_mask`` [B, T], ``labels`` [B] and ``index`` [B] (position of the sample
in its split, a stable key for per-sample caches), padded to the longest sequence in the batch.

The training loader is resumable mid-epoch (:class:`ResumableDataLoader`): its epoch and position are part
of a Lightning checkpoint, so a run resumed with ``--ckpt_path`` sees exactly the batches an uninterrupted
run would have seen.
"""

import math
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_mobillm.data.sources import BIGBENCH_PREFIX, offline_class_names, offline_source

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_STAGE_SPLITS = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("test",),
}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

RawSplit = tuple[list[str], list[int]]  # texts, label indices


# --------------------------------------------------------------------------- splitting


def stratified_counts(class_sizes: Sequence[int], total: int) -> list[int]:
    """Per-class counts that sum to ``total`` and are proportional to ``class_sizes`` (largest remainder,
    ties to the lower class index), so each count is within 1 of its exact share."""
    n = sum(class_sizes)
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} of {n} samples")
    if n == 0:
        return [0] * len(class_sizes)
    exact = [size * total / n for size in class_sizes]
    counts = [min(size, math.floor(e)) for size, e in zip(class_sizes, exact)]
    order = sorted(range(len(class_sizes)), key=lambda c: (counts[c] - exact[c], c))
    for c in order[: total - sum(counts)]:
        counts[c] += 1
    return counts


def stratified_split(labels: Sequence[int], total: int, seed: int | str) -> tuple[list[int], list[int]]:
    """Split positions ``0..len(labels)-1`` into ``(rest, taken)``, ``len(taken) == total``, stratified by
    label and seeded (string seeds are hashed deterministically, so every process gets the same split).
    Both lists are returned in ascending order."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    counts = stratified_counts([len(by_class[c]) for c in classes], total)
    rng = random.Random(seed)
    rest: list[int] = []
    taken: list[int] = []
    for c, k in zip(classes, counts):
        idx = list(by_class[c])
        rng.shuffle(idx)
        taken += idx[:k]
        rest += idx[k:]
    return sorted(rest), sorted(taken)


def verbalizer_words(datamodule: Any, method: str) -> list[str]:
    """The words whose first tokens score the classes: the data module's ``verbalizer_words`` (its class names
    unless the recipe gives ``data.verbalizers``), or its ``class_names`` for a data module without them."""
    words = getattr(datamodule, "verbalizer_words", None) or getattr(datamodule, "class_names", None)
    if not words:
        raise ValueError(f"{method} needs the data module's class names (or data.verbalizers) for its verbalizer")
    return list(words)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _select(split: RawSplit, idx: list[int]) -> RawSplit:
    texts, labels = split
    return [texts[i] for i in idx], [labels[i] for i in idx]


# --------------------------------------------------------------------------- tokenizing


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence when it adds special tokens
    (e.g. ``[CLS]``/``[SEP]`` for BERT, ``<s>`` for Llama, nothing for GPT-2 style tokenizers)."""
    probe = "hello world"
    full = list(tokenizer(probe)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def encode_prompts(tokenizer: Any, texts: Sequence[str], prompt: str, max_length: int) -> list[list[int]]:
    """Token ids of ``prompt`` with ``{text}`` replaced by each text, at most ``max_length`` long.

    The parts before and after ``{text}`` and the texts are tokenized separately and only the text is
    truncated (its end is dropped), so the suffix is always kept; the tokenizer's own special tokens
    (BOS / CLS / SEP) are added around the whole. Whitespace that ends the prefix is moved to the front
    of the text, which is how BPE tokenizers see it inside a single string.
    """
    prefix, marker, suffix = prompt.partition("{text}")
    if not marker or "{text}" in suffix:
        raise ValueError(f"prompt must contain '{{text}}' exactly once, got {prompt!r}")
    stripped = prefix.rstrip()
    lead = prefix[len(stripped) :]

    def encode(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

    head, tail = _special_tokens(tokenizer)
    before, after = head + encode(stripped), encode(suffix) + tail
    budget = max_length - len(before) - len(after)
    if budget < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for the text: the prompt and special tokens "
            f"alone take {len(before) + len(after)} tokens"
        )
    if not texts:
        return []
    # Let the tokenizer cut long texts itself (no "longer than the model" warning) when it cuts the end.
    cut = (
        {"truncation": True, "max_length": budget}
        if getattr(tokenizer, "truncation_side", "right") == "right"
        else {}
    )
    text_ids = tokenizer([lead + t for t in texts], add_special_tokens=False, **cut)["input_ids"]
    return [before + list(ids[:budget]) + after for ids in text_ids]


class TokenizedSplit(Dataset):
    """One pre-tokenized split; item ``i`` is ``{"input_ids": list[int], "labels": int, "index": i}``.

    Attributes:
        input_ids: token ids per sample (unpadded).
        labels: class index per sample.
        texts: the raw texts, in the same order.
    """

    def __init__(self, input_ids: list[list[int]], labels: list[int], texts: list[str]) -> None:
        self.input_ids, self.labels, self.texts = input_ids, labels, texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "index": i}


class PadCollator:
    """Pads a list of ``TokenizedSplit`` items to the longest one, on the left or the right."""

    def __init__(self, pad_token_id: int, padding_side: Literal["left", "right"] = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[b, cols] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            attention_mask[b, cols] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }


# --------------------------------------------------------------------------- a resumable training loader


class EpochSampler(Sampler[int]):
    """The sample order of each epoch, from the epoch's number alone (seeded), starting at a given place.

    Shuffled, epoch ``e`` is the order ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    gives in its epoch ``e`` (one process, whole epochs): that loader's generator draws, per epoch, a worker
    seed, the epoch's permutation and one more permutation its sampler discards; the same draws are replayed
    here, so the order is a function of ``(seed, epoch)`` and needs no state but the epoch to be resumed.
    Lightning calls :meth:`set_epoch` before each epoch; without it the next iteration is the next epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch = 0  # the epoch the next iteration yields
        self.start = 0  # how many of its samples to skip (a resumed epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def order(self, epoch: int) -> list[int]:
        n = self.num_samples
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            torch.randperm(n, generator=g)
            torch.randperm(n, generator=g)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        yield from self.order(epoch)[start:]

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place in the epoch is saved in a checkpoint: Lightning's ``_Stateful`` interface
    (``state_dict`` / ``load_state_dict``), which its fit loop stores with the loops' progress and loads back
    on a resume, mid-epoch included.

    The position counts batches this loader has handed out in the current epoch. Lightning asks a loader
    that has a length for a batch only when it trains on it (it prefetches only loaders without one), so at
    a checkpoint the count is exactly the batches trained on; a resumed epoch starts after them. The epoch
    is chosen when its first batch is asked for (after Lightning's ``set_epoch``), not at ``iter()``.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch (the last one may be smaller).
        shuffle: a seeded permutation per epoch (:class:`EpochSampler`), else split order.
        seed: the permutations' seed.
        **kwargs: other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...). A ``sampler`` given
            here replaces the epoch sampler (the loader is then not resumable: its state is empty).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, seed: int = 0,
                 **kwargs: Any) -> None:
        if kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None:
            kwargs["sampler"] = EpochSampler(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self._epoch: int | None = None  # the epoch being handed out
        self._handed_out = 0  # its batches handed out so far

    @property
    def _epochs(self) -> EpochSampler | None:
        return self.sampler if isinstance(self.sampler, EpochSampler) else None

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        sampler = self._epochs
        if sampler is not None:
            self._epoch, self._handed_out = sampler.epoch, sampler.start // self.batch_size
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self._epochs
        if sampler is None:
            return {}
        if self._epoch is None:
            epoch, batches = sampler.epoch, sampler.start // self.batch_size
        elif self._handed_out >= len(self):  # the epoch is over: the next one starts from its beginning
            epoch, batches = self._epoch + 1, 0
        else:
            epoch, batches = self._epoch, self._handed_out
        return {"epoch": epoch, "batches": batches, "num_samples": sampler.num_samples, "seed": sampler.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler = self._epochs
        if sampler is None or not state_dict:
            return
        saved = (state_dict["num_samples"], state_dict["seed"], state_dict["batch_size"])
        if saved != (sampler.num_samples, sampler.seed, self.batch_size):
            raise ValueError(f"the checkpoint's training loader had (samples, seed, batch_size) = {saved}, this "
                             f"one has {(sampler.num_samples, sampler.seed, self.batch_size)}: cannot resume its "
                             "position")
        sampler.epoch, sampler.start = int(state_dict["epoch"]), int(state_dict["batches"]) * self.batch_size
        self._epoch, self._handed_out = None, 0


# --------------------------------------------------------------------------- the data module


class TokenizerMixin:
    """The tokenizer side of a data module: ``tokenizer``, ``set_tokenizer`` (which drops splits tokenized with
    another tokenizer, ``self._encoded``) and ``_resolve_tokenizer`` (:func:`resolve_tokenizer` with
    ``self.tokenizer_name``)."""

    _tokenizer: Any
    _encoded: dict
    tokenizer_name: str | None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer in use, or None before ``set_tokenizer``/``setup``."""
        return self._tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this (Hugging Face) tokenizer; drops any splits tokenized with another one."""
        if tokenizer is not self._tokenizer:
            self._tokenizer = tokenizer
            self._encoded.clear()

    def _resolve_tokenizer(self) -> None:
        if self._tokenizer is None:
            self.set_tokenizer(resolve_tokenizer(self, self.tokenizer_name))


class TextClassificationDataModule(TokenizerMixin, L.LightningDataModule):
    """Text classification with a prompt template, for decoder or encoder backbones.

    Splits: a source's own ``train``/``validation``/``test`` splits are used as given; missing ones are
    carved out of ``train`` (stratified by label, seeded): first ``test`` (``test_fraction`` of it), then
    ``validation`` (``val_fraction`` of the rest). BBC News with the defaults: 1602 / 178 / 445.

    Args:
        dataset: an offline alias (``bbc_news``; ``vitaminc`` with ``data_files`` = its ``.jsonl``;
            ``bigbench:<task>``, a BIG-bench multiple-choice task with fixed choices such as
            ``bigbench:multiemo/all_text_en``, fetched once from the ``bigbench`` source archive), a
            ``datasets`` hub name or local dataset folder, a ``datasets`` builder (``json``, ``csv``,
            ``parquet``) used with ``data_files``, or a path to a ``.json``/``.jsonl``/``.csv`` file.
        data_files: file(s) for a builder: one path (a single pool that is split) or a dict mapping split
            names (``train``, ``validation``, ``test``) to paths.
        text_field: column holding the text.
        label_field: column holding the label (class index, class name, or ``datasets.ClassLabel``).
        class_names: the class list, fixing the label order. Needed only when labels are strings whose
            order matters; otherwise derived: ``ClassLabel`` names, the corpus' own list, or the sorted
            unique labels. Given with named labels, labels are remapped to this order.
        verbalizers: the word that answers the prompt for each class, whose first token's LM-head logit is the
            backbone's zero-shot score of the class (PAE's prior, MeZO's and Fed MobiLLM's classifier): a
            mapping from class name to word, or a list in class order. Default: the class names. Give words
            of their own to classes whose names share a first token (``search_creative_work`` and
            ``search_screening_event``) or read poorly (``sport`` for a label ``sports``).
        prompt: template where ``{text}`` is replaced by the text, e.g. ``"Article: {text}\\nTopic:"``.
        max_length: maximum tokens per sample, special tokens included; only the text is truncated.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict (default: ``batch_size``).
        val_fraction: share of the remaining pool held out for validation when the source has none.
        test_fraction: share of the whole pool held out for test when the source has none.
        seed: seed of the splits, the subsets and the training shuffle.
        limit_train_samples: keep only a stratified subset of this many training samples.
        limit_eval_samples: keep only a stratified subset of this many validation and test samples each.
        tokenizer: tokenizer folder or hub id. If None, ``setup`` takes the trainer strategy's
            ``tokenizer`` attribute, else loads the one of the module's ``backbone_config``; or call
            ``set_tokenizer`` first.
        padding_side: where pads go: ``right`` (encoders; decoders that pool the last real token) or
            ``left`` (the last position is always a real token).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: str = "bbc_news",
        data_files: str | dict[str, str] | None = None,
        text_field: str = "text",
        label_field: str = "label",
        class_names: list[str] | None = None,
        verbalizers: dict[str, str] | list[str] | None = None,
        prompt: str = "Article: {text}\nTopic:",
        max_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit_train_samples: int | None = None,
        limit_eval_samples: int | None = None,
        tokenizer: str | None = None,
        padding_side: Literal["left", "right"] = "right",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if "{text}" not in prompt:
            raise ValueError(f"prompt must contain '{{text}}', got {prompt!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {frac}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_files = data_files
        self.text_field, self.label_field = text_field, label_field
        self._given_class_names = list(class_names) if class_names is not None else None
        if verbalizers is not None and not isinstance(verbalizers, (dict, list, tuple)):
            raise ValueError(f"verbalizers must map class names to words, or list one word per class; got "
                             f"{verbalizers!r}")
        if verbalizers is not None and not all(isinstance(w, str) and w.strip()
                                               for w in (verbalizers.values() if isinstance(verbalizers, dict)
                                                         else verbalizers)):
            raise ValueError(f"verbalizers: every word must be a non-empty string, got {verbalizers!r}")
        self._verbalizers = dict(verbalizers) if isinstance(verbalizers, dict) else verbalizers
        self.prompt, self.max_length = prompt, max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.limit_train_samples, self.limit_eval_samples = limit_train_samples, limit_eval_samples
        self.tokenizer_name = tokenizer
        self.padding_side: Literal["left", "right"] = padding_side
        self.num_workers = num_workers
        self._tokenizer: Any = None
        self._class_names: list[str] | None = None
        self._splits: dict[str, RawSplit] | None = None
        self._encoded: dict[str, TokenizedSplit] = {}

    # ---------------------------------------------------------------- public surface

    @property
    def class_names(self) -> list[str]:
        """Class names, index = label id (available before ``setup``)."""
        if self._class_names is None:
            cheap = None
            if self._given_class_names is None and offline_source(self.dataset) is not None:
                cheap = offline_class_names(self.dataset)
            if cheap is not None:
                self._class_names = cheap
            else:
                self._load()
        assert self._class_names is not None
        return list(self._class_names)

    @property
    def verbalizer_words(self) -> list[str]:
        """One word per class, in class order: ``verbalizers`` if given, else the class names."""
        names = self.class_names
        given = self._verbalizers
        if given is None:
            return names
        if isinstance(given, dict):
            if missing := [n for n in names if n not in given]:
                raise ValueError(f"verbalizers has no word for the classes {missing} (classes: {names})")
            if extra := sorted(set(given) - set(names)):
                raise ValueError(f"verbalizers names classes the data has not: {extra} (classes: {names})")
            return [given[n] for n in names]
        if len(given) != len(names):
            raise ValueError(f"verbalizers lists {len(given)} words for {len(names)} classes ({names})")
        return list(given)

    @property
    def num_classes(self) -> int:
        """Number of classes (available before ``setup``)."""
        return len(self.class_names)

    def prepare_data(self) -> None:
        """Download hub datasets into the ``datasets`` cache, or a BIG-bench task into ours (rank 0 only);
        the packaged sources need nothing."""
        if offline_source(self.dataset) is None or self.dataset.startswith(BIGBENCH_PREFIX):
            self._load()

    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, split the data and tokenize the splits that ``stage`` needs (once)."""
        self._resolve_tokenizer()
        for split in _STAGE_SPLITS.get(stage or "", SPLITS):
            self.split_dataset(split)

    def split_dataset(self, split: str) -> TokenizedSplit:
        """The tokenized ``train``, ``validation`` or ``test`` split (tokenized on first use)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._encoded:
            if self._tokenizer is None:
                self._resolve_tokenizer()
            texts, labels = self._load()[split]
            ids = encode_prompts(self._tokenizer, texts, self.prompt, self.max_length)
            self._encoded[split] = TokenizedSplit(ids, labels, texts)
        return self._encoded[split]

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches, resumable mid-epoch (:class:`ResumableDataLoader`)."""
        return ResumableDataLoader(
            self.split_dataset("train"),
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            collate_fn=PadCollator(self._pad_token_id(), self.padding_side),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds, as before
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in split order."""
        return self._loader("validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in split order."""
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Test-split batches, in split order."""
        return self._loader("test", self.eval_batch_size)

    # ---------------------------------------------------------------- internals

    def _loader(self, split: str, batch_size: int, shuffle: bool = False, **kw: Any) -> DataLoader:
        return DataLoader(
            self.split_dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=PadCollator(self._pad_token_id(), self.padding_side),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kw,
        )

    def _pad_token_id(self) -> int:
        return pad_token_id(self._tokenizer)

    def _load(self) -> dict[str, RawSplit]:
        """Read the source, encode labels, make the three splits and apply the limits (cached)."""
        if self._splits is not None:
            return self._splits
        if offline_source(self.dataset) is not None:
            raw, source_names = self._read_offline()
        else:
            raw, source_names = self._read_hub()
        encoded, self._class_names = _encode_labels(raw, source_names, self._given_class_names)
        splits = self._assign_splits(encoded)
        limits = {"train": self.limit_train_samples, "validation": self.limit_eval_samples}
        limits["test"] = self.limit_eval_samples
        for name, limit in limits.items():
            if limit is not None and limit < len(splits[name][1]):
                _, keep = stratified_split(splits[name][1], limit, f"{self.seed}-limit-{name}")
                splits[name] = _select(splits[name], keep)
        self._splits = splits
        return splits

    def _read_offline(self) -> tuple[dict[str, tuple[list[str], list[Any]]], list[str]]:
        loader = offline_source(self.dataset)
        assert loader is not None
        records, names = loader(self.data_files)
        columns = sorted(records[0]) if records else []
        _check_fields(self.dataset, columns, self.text_field, self.label_field)
        raw: dict[str, tuple[list[str], list[Any]]] = {}
        for r in records:
            texts, labels = raw.setdefault(r.get("split", "train"), ([], []))
            texts.append(str(r[self.text_field]))
            labels.append(r[self.label_field])
        return raw, names

    def _read_hub(self) -> tuple[dict[str, tuple[list[str], list[Any]]], list[str] | None]:
        import datasets

        ds = load_hub_dataset(self.dataset, self.data_files)
        raw: dict[str, tuple[list[str], list[Any]]] = {}
        source_names: list[str] | None = None
        for split, part in ds.items():
            _check_fields(f"{self.dataset}[{split}]", part.column_names, self.text_field, self.label_field)
            feature = part.features[self.label_field]
            labels = list(part[self.label_field])
            if isinstance(feature, datasets.ClassLabel):
                source_names = list(feature.names)
                if labels and all(y == -1 for y in labels):
                    warnings.warn(
                        f"{self.dataset}[{split}] is unlabelled (all -1); ignoring it", stacklevel=2
                    )
                    continue
            texts = ["" if t is None else str(t) for t in part[self.text_field]]
            raw[split] = (texts, labels)
        return raw, source_names

    def _assign_splits(self, raw: dict[str, RawSplit]) -> dict[str, RawSplit]:
        named: dict[str, RawSplit] = {}
        for split, data in raw.items():
            key = _SPLIT_ALIASES.get(split.lower())
            if key is not None and key not in named:
                named[key] = data
        if "train" not in named:
            if len(raw) != 1:
                raise ValueError(f"{self.dataset}: no 'train' split among {sorted(raw)}")
            named = {"train": next(iter(raw.values()))}
        train = named["train"]
        if "test" not in named:
            total = _round(len(train[1]) * self.test_fraction)
            rest, test = stratified_split(train[1], total, f"{self.seed}-test")
            train, named["test"] = _select(train, rest), _select(train, test)
        if "validation" not in named:
            total = _round(len(train[1]) * self.val_fraction)
            rest, val = stratified_split(train[1], total, f"{self.seed}-validation")
            train, named["validation"] = _select(train, rest), _select(train, val)
        named["train"] = train
        return {s: named[s] for s in SPLITS}


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id to pad with")


def resolve_tokenizer(datamodule: L.LightningDataModule, name: str | None) -> Any:
    """The tokenizer a data module should use: ``name`` (a folder or hub id) when given, else its trainer's
    strategy's ``tokenizer``, else the one of its LightningModule's ``backbone_config``."""
    if name is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    try:
        trainer = datamodule.trainer
    except RuntimeError:
        trainer = None
    if trainer is not None:
        tok = getattr(trainer.strategy, "tokenizer", None)
        if tok is not None:
            return tok
        config = getattr(trainer.lightning_module, "backbone_config", None)
        if config is not None:
            from lightning_mobillm.backbone import load_tokenizer

            return load_tokenizer(config)
    raise RuntimeError(
        f"{type(datamodule).__name__} has no tokenizer: pass tokenizer='<folder or hub id>', call "
        "set_tokenizer(), or attach it to a Trainer whose strategy has a `tokenizer` or whose "
        "LightningModule has a `backbone_config`"
    )


def load_hub_dataset(name: str, data_files: str | dict[str, str] | None) -> Any:
    """``datasets.load_dataset`` for a data module's ``dataset``/``data_files``: a ``.json``/``.jsonl``/``.csv``/
    ``.parquet`` path alone is read with its builder; a single ``Dataset`` becomes a ``DatasetDict`` with a
    ``train`` split."""
    import datasets

    suffix = Path(name).suffix.lower()
    if data_files is None and suffix in _FILE_BUILDERS and Path(name).is_file():
        name, data_files = _FILE_BUILDERS[suffix], name
    ds = datasets.load_dataset(name, data_files=data_files) if data_files else datasets.load_dataset(name)
    return datasets.DatasetDict({"train": ds}) if isinstance(ds, datasets.Dataset) else ds


def _check_fields(source: str, columns: Sequence[str], *fields: str) -> None:
    for field in fields:
        if field not in columns:
            raise KeyError(f"{source} has no field {field!r}; available columns: {list(columns)}")


def _encode_labels(
    raw: dict[str, tuple[list[str], list[Any]]],
    source_names: list[str] | None,
    class_names: list[str] | None,
) -> tuple[dict[str, RawSplit], list[str]]:
    """Turn labels into indices of the final class list (``class_names`` if given, else derived)."""
    values = [y for _, labels in raw.values() for y in labels]
    if source_names is not None:  # ClassLabel / offline corpus: values index source_names
        bad = sorted({y for y in values if not (isinstance(y, int) and 0 <= y < len(source_names))}, key=str)
        if bad:
            raise ValueError(f"labels {bad} are outside the class list {source_names}")
        names = class_names if class_names is not None else list(source_names)
        missing = sorted({source_names[y] for y in values} - set(names))
        if missing:
            raise ValueError(f"labels {missing} are not in class_names={names}")
        index = {n: i for i, n in enumerate(names)}
        return {s: (t, [index[source_names[y]] for y in ys]) for s, (t, ys) in raw.items()}, names
    is_int = all(isinstance(y, int) and not isinstance(y, bool) for y in values)
    if is_int and class_names is not None:  # integer labels index the given class list
        bad = sorted({y for y in values if not 0 <= y < len(class_names)})
        if bad:
            raise ValueError(
                f"labels {bad} are outside class_names={class_names} (indices 0..{len(class_names) - 1})"
            )
        return {s: (t, list(ys)) for s, (t, ys) in raw.items()}, list(class_names)
    if is_int:  # derived: the sorted unique integers
        index_of: dict[Any, int] = {y: i for i, y in enumerate(sorted(set(values)))}
        names = [str(y) for y in index_of]
    else:  # named labels: the given order, or sorted
        raw = {s: (t, [str(y) for y in ys]) for s, (t, ys) in raw.items()}
        seen = {y for _, ys in raw.values() for y in ys}
        names = list(class_names) if class_names is not None else sorted(seen)
        missing = sorted(seen - set(names))
        if missing:
            raise ValueError(f"labels {missing} are not in class_names={names}")
        index_of = {n: i for i, n in enumerate(names)}
    return {s: (t, [index_of[y] for y in ys]) for s, (t, ys) in raw.items()}, names
