"""Instruction data for generative fine-tuning (prompt/answer pairs) as a LightningDataModule.

A sample is a prompt and the answer the model should write. The prompt is rendered either with the
tokenizer's chat template (``format: chat``; a user turn, an optional system turn, then the template's
generation prompt) or as plain text (``format: plain``); ``auto`` picks the chat template when the tokenizer
has one. The answer follows, then what ends it: the chat template's end of turn (``answer_end_ids``), or EOS
in plain format. Only the answer is trained on by default (the prompt's
labels are ``-100``, the Hugging Face convention: ``labels[t]`` is the token at ``t`` and a causal LM
predicts it from position ``t - 1``).

An over-long sample loses prompt, never answer: only the prompt's text (the ``{text}`` in ``template``, or the
last user message of a chat) is cut, from its end, so the template's own tokens around it survive; a sample
whose answer cannot fit at all is dropped, and the number dropped is reported.

Batches are dicts of ``input_ids`` [B, T], ``attention_mask`` [B, T], ``labels`` [B, T], ``prompt_length``
[B] and ``index`` [B] (the sample's position in its split). :meth:`InstructionDataModule.generation_dataloader`
gives left-padded prompts alone, for ``generate``; :meth:`InstructionDataModule.references` the answers to
score against.

Sources: ``bbc_headlines`` (the BBC News package installed with the project: the body is the prompt, the
title the answer; duplicated bodies dropped), ``bigbench:<task>`` (a generative BIG-bench task from the
source archive, :mod:`lightning_mobillm.data.bigbench`: ``input`` and ``target``; several targets are all
kept as references), or a ``datasets`` hub name, builder or ``.json``/``.jsonl``/``.csv`` file with a prompt
and an answer column, or a column of chat messages (the last, an assistant message, is the answer).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_mobillm.data.sources import BIGBENCH_PREFIX, load_bbc_headlines
from lightning_mobillm.data.text_classification import (
    _SPLIT_ALIASES,
    _STAGE_SPLITS,
    SPLITS,
    ResumableDataLoader,
    TokenizerMixin,
    _check_fields,
    _round,
    _special_tokens,
    load_hub_dataset,
    pad_token_id,
    stratified_split,
)

IGNORE_INDEX = -100
"""The label of a position that is not trained on (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

DEFAULT_TEMPLATES: dict[str, dict[str, str]] = {
    "bbc_headlines": {"chat": "Write a headline for this news article.\n\n{text}",
                      "plain": "Article: {text}\nHeadline:"},
}
"""Per-source templates for each format, used when ``template`` is not given."""

_MARK = "\ue000text\ue000"  # stands for the prompt's text inside a rendered chat (a private-use character)


@dataclass
class InstructionRecord:
    """One raw sample: ``prompt`` (text, or chat messages), the ``answer`` trained on and every acceptable
    ``references`` answer (for metrics), a ``group`` that stratifies the splits, its source ``split`` if any."""

    prompt: str | list[dict[str, str]]
    answer: str
    references: list[str] = field(default_factory=list)
    group: int = 0
    split: str | None = None


class InstructionSplit(Dataset):
    """One tokenized split; item ``i`` is ``{"input_ids", "labels", "prompt_length", "index"}``.

    Attributes:
        input_ids: prompt + answer + EOS per sample (unpadded).
        labels: ``IGNORE_INDEX`` on the prompt (unless trained on), the token ids on the answer and EOS.
        prompt_lengths: tokens of each prompt (the answer starts there).
        records: the raw samples, in the same order.
    """

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]], prompt_lengths: list[int],
                 records: list[InstructionRecord]) -> None:
        self.input_ids, self.labels, self.prompt_lengths, self.records = input_ids, labels, prompt_lengths, records

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i],
                "prompt_length": self.prompt_lengths[i], "index": i}


class InstructionCollator:
    """Pads samples to the longest one: ``input_ids`` with the pad id, ``labels`` with ``IGNORE_INDEX``.
    ``prompt_only`` keeps only each prompt and pads on the left (what ``generate`` wants)."""

    def __init__(self, pad_token_id: int, padding_side: Literal["left", "right"] = "right",
                 prompt_only: bool = False) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.prompt_only = pad_token_id, prompt_only
        self.padding_side: Literal["left", "right"] = "left" if prompt_only else padding_side

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [it["input_ids"][: it["prompt_length"]] if self.prompt_only else it["input_ids"] for it in items]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for b, (it, seq) in enumerate(zip(items, seqs)):
            n = len(seq)
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[b, cols] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[b, cols] = 1
            if not self.prompt_only:
                labels[b, cols] = torch.as_tensor(it["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "prompt_length": torch.tensor([it["prompt_length"] for it in items], dtype=torch.long),
                 "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
        if not self.prompt_only:
            batch["labels"] = labels
        return batch


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], template: str, fmt: str,
                  system: str | None) -> tuple[str, str, str]:
    """``(before, text, after)``: the rendered prompt split around the text that may be cut.

    A string prompt fills ``{text}`` in ``template`` (the user turn in a chat); chat messages are rendered as
    they are, with the last user message's content as the text that may be cut."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": template.replace("{text}", _MARK)}]
        text = prompt
    else:
        messages = [dict(m) for m in prompt]
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            raise ValueError("a chat prompt needs a user message")
        text, messages[users[-1]]["content"] = messages[users[-1]]["content"], _MARK
    if system is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if fmt == "chat":
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif isinstance(prompt, str):  # the template itself, after the system line if there is one
        rendered = "".join(f"{m['content']}\n" for m in messages[:-1]) + messages[-1]["content"]
    else:  # plain text for a chat: "Role: content" lines, then the assistant's cue
        rendered = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\nAssistant:"
    before, mark, after = rendered.partition(_MARK)
    if not mark or _MARK in after:
        raise ValueError(f"the rendered prompt must hold the text exactly once; got {rendered!r}")
    return before, text, after


class InstructionDataModule(TokenizerMixin, L.LightningDataModule):
    """Prompt/answer pairs for causal-LM fine-tuning and generation.

    Splits: a source's own ``train``/``validation``/``test`` splits are used as given; missing ones are
    carved out of ``train`` (stratified by topic where the source has one, seeded): first ``test``
    (``test_fraction``), then ``validation`` (``val_fraction`` of the rest). ``bbc_headlines`` with the
    defaults: 2092 articles after deduplication, 1507 / 167 / 418.

    Args:
        dataset: ``bbc_headlines``, ``bigbench:<task>`` (a generative BIG-bench task, e.g. ``bigbench:gem/xsum``),
            a ``datasets`` hub name or local folder, a builder (``json``, ``csv``, ``parquet``) with
            ``data_files``, or a ``.json``/``.jsonl``/``.csv`` file.
        data_files: file(s) for a builder: one path or a dict from split name to path.
        prompt_field: the column holding the prompt text.
        answer_field: the column holding the answer (a string, or a list whose first item is trained on and
            all of which are references).
        messages_field: a column of chat messages (``[{"role", "content"}, ...]``) instead of the two above;
            the last message, the assistant's, is the answer.
        template: the prompt around ``{text}`` (the user turn in chat format); default: the source's own
            (``DEFAULT_TEMPLATES``), else ``"{text}"``.
        format: ``chat`` (the tokenizer's chat template), ``plain`` (the template as plain text) or ``auto``
            (chat when the tokenizer has a chat template).
        system: a system message (chat format), or a first line (plain format).
        answer_prefix: text put before the answer (default: a space in plain format, nothing in chat format,
            whose generation prompt ends the line).
        max_length: tokens per sample, prompt + answer + EOS; prompts are cut to fit, answers never.
        train_on_prompt: also train on the prompt's tokens (default: the answer only).
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test, predict and generation (default: ``batch_size``).
        val_fraction: share of the remaining pool held out for validation when the source has none.
        test_fraction: share of the whole pool held out for test when the source has none.
        seed: seed of the splits, the subsets and the training shuffle.
        limit_train_samples: keep only a stratified subset of this many training samples.
        limit_eval_samples: keep only a stratified subset of this many validation and test samples each.
        generate_samples: how many validation samples (the first, a fixed subset) generation metrics use.
        tokenizer: tokenizer folder or hub id; default: the trainer strategy's or the module's backbone's.
        padding_side: where pads go in training and validation batches.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: str = "bbc_headlines",
        data_files: str | dict[str, str] | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        messages_field: str | None = None,
        template: str | None = None,
        format: Literal["auto", "chat", "plain"] = "auto",
        system: str | None = None,
        answer_prefix: str | None = None,
        max_length: int = 512,
        train_on_prompt: bool = False,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit_train_samples: int | None = None,
        limit_eval_samples: int | None = None,
        generate_samples: int = 64,
        tokenizer: str | None = None,
        padding_side: Literal["left", "right"] = "right",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if format not in ("auto", "chat", "plain"):
            raise ValueError(f"format must be 'auto', 'chat' or 'plain', got {format!r}")
        if template is not None and template.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once, got {template!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {frac}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one prompt token, EOS), got {max_length}")
        if generate_samples < 0:
            raise ValueError(f"generate_samples must be >= 0, got {generate_samples}")
        self.save_hyperparameters()
        self.dataset, self.data_files = dataset, data_files
        self.prompt_field, self.answer_field, self.messages_field = prompt_field, answer_field, messages_field
        self._template, self.format, self.system, self._answer_prefix = template, format, system, answer_prefix
        self.max_length, self.train_on_prompt = max_length, train_on_prompt
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.limit_train_samples, self.limit_eval_samples = limit_train_samples, limit_eval_samples
        self.generate_samples = generate_samples
        self.tokenizer_name = tokenizer
        self.padding_side: Literal["left", "right"] = padding_side
        self.num_workers = num_workers
        self._tokenizer: Any = None
        self._splits: dict[str, list[InstructionRecord]] | None = None
        self._encoded: dict[str, InstructionSplit] = {}
        self.dropped: dict[str, int] = {}
        """Samples dropped per split because their answer could not fit in ``max_length``."""

    # ---------------------------------------------------------------- public surface

    @property
    def resolved_format(self) -> Literal["chat", "plain"]:
        """``chat`` or ``plain``: ``auto`` resolved against the tokenizer."""
        if self.format != "auto":
            return self.format
        return "chat" if getattr(self._tokenizer, "chat_template", None) else "plain"

    @property
    def template(self) -> str:
        """The prompt template in use (``{text}`` stands for the prompt's text)."""
        if self._template is not None:
            return self._template
        return DEFAULT_TEMPLATES.get(self.dataset, {}).get(self.resolved_format, "{text}")

    @property
    def answer_end_ids(self) -> list[int]:
        """The tokens that end an answer: in chat format what the chat template writes after an assistant turn
        (``<|im_end|>``, Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``; trailing whitespace dropped), so a
        fine-tuned model ends its turn as the chat stack expects; in plain format (or when the template writes
        nothing) the EOS token."""
        tok = self._tokenizer
        eos = getattr(tok, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id: the answer could not be ended")
        if self.resolved_format == "chat":
            messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}]
            if self.system is not None:
                messages.insert(0, {"role": "system", "content": self.system})
            rendered = tok.apply_chat_template(messages, tokenize=False)
            _, mark, after = rendered.partition(_MARK)
            end = list(tok(after.rstrip(), add_special_tokens=False)["input_ids"]) if mark and after.strip() else []
            if end:
                return end
        return [int(eos)]

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids at which generation stops: the last token of :attr:`answer_end_ids`, and EOS."""
        ids = [self.answer_end_ids[-1], int(self._tokenizer.eos_token_id)]
        return list(dict.fromkeys(ids))

    @property
    def answer_prefix(self) -> str:
        """Text before the answer: given, else a space in plain format and nothing in chat format."""
        if self._answer_prefix is not None:
            return self._answer_prefix
        return "" if self.resolved_format == "chat" else " "

    def prepare_data(self) -> None:
        """Download a hub dataset, or a BIG-bench task into the cache (rank 0 only); packaged data needs nothing."""
        if self.dataset != "bbc_headlines":
            self._load()

    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, split the data and tokenize the splits that ``stage`` needs (once)."""
        self._resolve_tokenizer()
        for split in _STAGE_SPLITS.get(stage or "", SPLITS):
            self.split_dataset(split)

    def records(self, split: str) -> list[InstructionRecord]:
        """The raw samples of a split, before tokenizing (samples whose answer cannot fit included)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self._load()[split])

    def split_dataset(self, split: str) -> InstructionSplit:
        """The tokenized ``train``, ``validation`` or ``test`` split (tokenized on first use)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._encoded:
            self._resolve_tokenizer()
            self._encoded[split] = self._encode(split, self._load()[split])
        return self._encoded[split]

    def references(self, split: str = "validation", limit: int | None = None) -> list[list[str]]:
        """Every acceptable answer of each tokenized sample of a split (its first ``limit``)."""
        records = self.split_dataset(split).records[:limit]
        return [r.references or [r.answer] for r in records]

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches, resumable mid-epoch."""
        return ResumableDataLoader(
            self.split_dataset("train"), batch_size=self.batch_size, shuffle=True, seed=self.seed,
            collate_fn=InstructionCollator(pad_token_id(self._tokenizer), self.padding_side),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        """Teacher-forced validation batches, in split order."""
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        """Teacher-forced test batches, in split order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Left-padded test prompts, in split order (for generation)."""
        return self.generation_dataloader("test")

    def generation_dataloader(self, split: str = "validation", limit: int | None = None) -> DataLoader:
        """Left-padded prompts of a split (its first ``limit`` samples; for ``validation`` default
        ``generate_samples``), in split order, for ``model.generate``."""
        data = self.split_dataset(split)
        if limit is None and split == "validation":
            limit = self.generate_samples
        subset = data if limit is None else torch.utils.data.Subset(data, range(min(limit, len(data))))
        return DataLoader(subset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=InstructionCollator(pad_token_id(self._tokenizer), prompt_only=True))

    # ---------------------------------------------------------------- internals

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.split_dataset(split), batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=InstructionCollator(pad_token_id(self._tokenizer), self.padding_side),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def _encode(self, split: str, records: list[InstructionRecord]) -> InstructionSplit:
        tok, fmt = self._tokenizer, self.resolved_format
        if fmt == "chat" and not getattr(tok, "chat_template", None):
            raise ValueError("format='chat' needs a tokenizer with a chat template; this one has none "
                             "(use format='plain' or 'auto')")
        end = self.answer_end_ids
        head = [] if fmt == "chat" else _special_tokens(tok)[0]  # a chat template writes its own BOS

        def encode(s: str) -> list[int]:
            return list(tok(s, add_special_tokens=False)["input_ids"]) if s else []

        rendered: dict[tuple[str, str], tuple[list[int], str, list[int]]] = {}
        input_ids: list[list[int]] = []
        labels: list[list[int]] = []
        lengths: list[int] = []
        kept: list[InstructionRecord] = []
        for r in records:
            before, text, after = render_prompt(tok, r.prompt, self.template, fmt, self.system)
            key = (before, after)
            if key not in rendered:  # a string prompt renders the same around every text
                stripped = before.rstrip()
                rendered[key] = (head + encode(stripped), before[len(stripped):], encode(after))
            before_ids, lead, after_ids = rendered[key]
            answer_ids = encode(self.answer_prefix + r.answer) + end
            budget = self.max_length - len(before_ids) - len(after_ids) - len(answer_ids)
            if budget < 0:
                continue
            prompt_ids = before_ids + encode(lead + text)[:budget] + after_ids
            input_ids.append(prompt_ids + answer_ids)
            labels.append((list(prompt_ids) if self.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids))
                          + answer_ids)
            lengths.append(len(prompt_ids))
            kept.append(r)
        self.dropped[split] = len(records) - len(kept)
        if self.dropped[split]:
            warnings.warn(f"{self.dataset}[{split}]: {self.dropped[split]} of {len(records)} samples dropped: "
                          f"their answer does not fit in max_length={self.max_length}", stacklevel=2)
        if records and not kept:
            raise ValueError(f"{self.dataset}[{split}]: no sample fits in max_length={self.max_length}")
        return InstructionSplit(input_ids, labels, lengths, kept)

    def _load(self) -> dict[str, list[InstructionRecord]]:
        """Read the source, make the three splits and apply the limits (cached)."""
        if self._splits is not None:
            return self._splits
        raw = self._read()
        splits = self._assign_splits(raw)
        limits = {"train": self.limit_train_samples, "validation": self.limit_eval_samples,
                  "test": self.limit_eval_samples}
        for name, limit in limits.items():
            if limit is not None and limit < len(splits[name]):
                _, keep = stratified_split([r.group for r in splits[name]], limit, f"{self.seed}-limit-{name}")
                splits[name] = [splits[name][i] for i in keep]
        self._splits = splits
        return splits

    def _read(self) -> list[InstructionRecord]:
        if self.dataset == "bbc_headlines":
            if self.data_files is not None:
                raise ValueError("dataset='bbc_headlines' reads the packaged corpus; it takes no data_files")
            rows, _ = load_bbc_headlines()
            return [InstructionRecord(r["prompt"], r["answer"], [r["answer"]], r["group"]) for r in rows]
        if self.dataset.startswith(BIGBENCH_PREFIX):
            from lightning_mobillm.data.bigbench import _check_name, generative_records

            if self.data_files is not None:
                raise ValueError(f"dataset='{self.dataset}' reads the task from the BIG-bench archive; it takes "
                                 "no data_files")
            rows = generative_records(_check_name(self.dataset[len(BIGBENCH_PREFIX):]))
            return [InstructionRecord(r["prompt"], r["answer"], r["references"]) for r in rows]
        return self._read_hub()

    def _read_hub(self) -> list[InstructionRecord]:
        ds = load_hub_dataset(self.dataset, self.data_files)
        out: list[InstructionRecord] = []
        fields = (self.messages_field,) if self.messages_field else (self.prompt_field, self.answer_field)
        for split, part in ds.items():
            _check_fields(f"{self.dataset}[{split}]", part.column_names, *fields)
            for i, row in enumerate(part):
                out.append(self._record(row, f"{self.dataset}[{split}][{i}]", split))
        return out

    def _record(self, row: dict[str, Any], where: str, split: str | None) -> InstructionRecord:
        if self.messages_field:
            messages = row[self.messages_field]
            if (not isinstance(messages, list) or len(messages) < 2
                    or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
                raise ValueError(f"{where}: {self.messages_field!r} must be a list of at least two "
                                 "{'role', 'content'} messages")
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"{where}: the last message must be the assistant's answer, got role "
                                 f"{messages[-1]['role']!r}")
            answer = str(messages[-1]["content"])
            return InstructionRecord([dict(role=m["role"], content=str(m["content"])) for m in messages[:-1]],
                                     answer, [answer], split=split)
        prompt, answer = row[self.prompt_field], row[self.answer_field]
        answers = [answer] if isinstance(answer, str) else answer
        if (not isinstance(prompt, str) or not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where}: {self.prompt_field!r} must be a string and {self.answer_field!r} a string "
                             "or a list of strings")
        return InstructionRecord(prompt, answers[0], list(answers), split=split)

    def _assign_splits(self, raw: list[InstructionRecord]) -> dict[str, list[InstructionRecord]]:
        named: dict[str, list[InstructionRecord]] = {}
        sources = sorted({r.split for r in raw if r.split is not None})
        for split in sources:
            key = _SPLIT_ALIASES.get(split.lower())
            if key is not None and key not in named:
                named[key] = [r for r in raw if r.split == split]
        if "train" not in named:
            if len(sources) > 1:
                raise ValueError(f"{self.dataset}: no 'train' split among {sources}")
            named = {"train": list(raw)}
        train = named["train"]
        for split, frac in (("test", self.test_fraction), ("validation", self.val_fraction)):
            if split not in named:
                rest, taken = stratified_split([r.group for r in train], _round(len(train) * frac),
                                               f"{self.seed}-{split}")
                train, named[split] = [train[i] for i in rest], [train[i] for i in taken]
        named["train"] = train
        return {s: named[s] for s in SPLITS}


def answer_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose next token is trained on (``labels[:, t + 1]`` is not ignored),
    i.e. the positions whose output enters a causal LM's loss; the last position never does, and with
    ``attention_mask`` no padding position does (a left-padded sample trained on its prompt would otherwise mark
    the pad before its first token)."""
    out = torch.zeros_like(labels, dtype=torch.bool)
    out[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        out &= attention_mask.bool()
    return out


__all__: Sequence[str] = ("IGNORE_INDEX", "InstructionCollator", "InstructionDataModule", "InstructionRecord",
                          "InstructionSplit", "answer_positions", "render_prompt")
