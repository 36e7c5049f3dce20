"""InstructionDataModule: rendering, answer-only labels, prompt truncation, splits, padding, sources."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer

from lightning_mobillm.data.bigbench import generative_records
from lightning_mobillm.data.instruction import (
    IGNORE_INDEX,
    InstructionDataModule,
    answer_positions,
)

pytestmark = pytest.mark.timeout(120)

CHAT = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end] {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}")


def _tok(chat: bool = False):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[user]", "[system]", "[assistant]", "[end]"]})
    if chat:
        tok.chat_template = CHAT
    return tok


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=60):
    words = "match goal team coach player league score win season cup".split()
    return [{"prompt": " ".join(words[(i + k) % 10] for k in range(3 + i % 7)), "answer": f"{words[i % 10]} win"}
            for i in range(n)]


def _dm(path, tok, **kw):
    dm = InstructionDataModule(dataset=str(path), **kw)
    dm.set_tokenizer(tok)
    return dm


def test_plain_labels_are_the_answer_and_eos_only(tmp_path):
    tok = _tok()
    dm = _dm(_write(tmp_path / "d.jsonl", _rows()), tok, template="Article: {text} Topic:", max_length=64)
    assert dm.resolved_format == "plain" and dm.answer_prefix == " "
    data = dm.split_dataset("train")
    rec, ids, labels, n = data.records[0], data.input_ids[0], data.labels[0], data.prompt_lengths[0]
    answer = tok(" " + rec.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = tok("Article: " + rec.prompt + " Topic:", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer and n == len(prompt)
    assert labels == [IGNORE_INDEX] * n + answer
    on_prompt = _dm(tmp_path / "d.jsonl", tok, template="Article: {text} Topic:", train_on_prompt=True)
    assert on_prompt.split_dataset("train").labels[0] == ids


def test_long_prompts_lose_prompt_never_answer(tmp_path):
    tok = _tok()
    rows = [{"prompt": " ".join(["goal"] * 50), "answer": "team win"},
            {"prompt": "goal", "answer": " ".join(["cup"] * 40)}]
    dm = _dm(_write(tmp_path / "d.jsonl", rows * 10), tok, template="Article: {text} Topic:", max_length=20,
             val_fraction=0.0, test_fraction=0.0)
    with pytest.warns(UserWarning, match="10 of 20 samples dropped"):
        data = dm.split_dataset("train")
    assert dm.dropped["train"] == 10 and len(data) == 10
    topic = tok(" Topic:", add_special_tokens=False)["input_ids"]
    answer = tok(" team win", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for ids, n in zip(data.input_ids, data.prompt_lengths):
        assert len(ids) == 20 and ids[n:] == answer and ids[n - len(topic):n] == topic  # the template's end kept
    empty = _dm(tmp_path / "d.jsonl", tok, template="Article: {text} Topic:", max_length=5, val_fraction=0.0,
                test_fraction=0.0)
    with pytest.warns(UserWarning, match="10 of 20 samples dropped"):
        assert all(n == 2 for n in empty.split_dataset("train").prompt_lengths)  # the whole text cut, not the answer
    with pytest.raises(ValueError, match="no sample fits in max_length=4"), pytest.warns(UserWarning):
        _dm(tmp_path / "d.jsonl", tok, template="Article: {text} Topic:", max_length=4).split_dataset("train")


def test_chat_template_renders_system_user_and_generation_prompt(tmp_path):
    tok = _tok(chat=True)
    dm = _dm(_write(tmp_path / "d.jsonl", _rows()), tok, template="Topic {text}", system="today")
    assert dm.resolved_format == "chat" and dm.answer_prefix == ""
    data = dm.split_dataset("train")
    rec, n = data.records[0], data.prompt_lengths[0]
    text = tok.decode(data.input_ids[0][:n])
    assert text.startswith("[system] today [end] [user] Topic " + rec.prompt + " [end]")
    assert text.rstrip().endswith("[end] [assistant]")
    end = tok.convert_tokens_to_ids("[end]")  # the answer ends as the template ends an assistant turn, not with EOS
    assert dm.answer_end_ids == [end] and dm.stop_token_ids == [end, tok.eos_token_id]
    assert data.input_ids[0][-1] == end
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        _dm(tmp_path / "d.jsonl", _tok(), format="chat").split_dataset("train")


def test_messages_field_answers_with_the_last_assistant_message(tmp_path):
    tok = _tok(chat=True)
    rows = [{"messages": [{"role": "user", "content": "goal team"}, {"role": "assistant", "content": "win"}]}] * 12
    dm = _dm(_write(tmp_path / "m.jsonl", rows), tok, messages_field="messages")
    data = dm.split_dataset("train")
    assert data.records[0].answer == "win" and data.records[0].references == ["win"]
    answer = tok("win", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("[end]")]
    assert data.labels[0][data.prompt_lengths[0]:] == answer
    bad = [{"messages": [{"role": "user", "content": "goal"}, {"role": "user", "content": "team"}]}] * 3
    with pytest.raises(ValueError, match="the last message must be the assistant's answer"):
        _dm(_write(tmp_path / "bad.jsonl", bad), tok, messages_field="messages").split_dataset("train")
    with pytest.raises(KeyError, match="no field 'messages'"):
        _dm(_write(tmp_path / "p.jsonl", _rows()), tok, messages_field="messages").records("train")


def test_batches_pad_labels_with_ignore_and_prompts_on_the_left(tmp_path):
    tok = _tok()
    dm = _dm(_write(tmp_path / "d.jsonl", _rows()), tok, batch_size=6, eval_batch_size=6, generate_samples=4)
    batch = next(iter(dm.val_dataloader()))
    data = dm.split_dataset("validation")
    assert len(batch["index"]) == len(data) == 5  # 60 samples: 12 test, 5 validation
    for b in range(5):
        n, ids = int(batch["prompt_length"][b]), data.input_ids[b]
        assert batch["input_ids"][b, : len(ids)].tolist() == ids
        assert (batch["labels"][b, len(ids):] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][b].sum() == len(ids))
        positions = answer_positions(batch["labels"])[b].nonzero().flatten().tolist()
        assert positions == list(range(n - 1, len(ids) - 1))  # the positions whose next token is the answer
    gen = list(dm.generation_dataloader())
    assert sum(len(g["index"]) for g in gen) == 4 and "labels" not in gen[0]
    g = gen[0]
    for b in range(len(g["index"])):
        n = int(g["prompt_length"][b])
        assert g["input_ids"][b, -n:].tolist() == data.input_ids[b][:n]  # left-padded: the prompt ends last
        assert g["attention_mask"][b, : g["input_ids"].shape[1] - n].sum() == 0
    assert dm.references("validation", 2) == [[r.answer] for r in data.records[:2]]


def test_splits_are_seeded_disjoint_and_limited(tmp_path):
    tok = _tok()
    path = _write(tmp_path / "d.jsonl", [dict(r, prompt=f"{r['prompt']} {i}") for i, r in enumerate(_rows(100))])
    a, b = (_dm(path, tok, seed=3) for _ in range(2))
    prompts = {s: [r.prompt for r in a.records(s)] for s in ("train", "validation", "test")}
    assert prompts == {s: [r.prompt for r in b.records(s)] for s in prompts}
    assert [len(v) for v in prompts.values()] == [72, 8, 20]
    assert len(set().union(*prompts.values())) == 100
    assert [r.prompt for r in _dm(path, tok, seed=4).records("test")] != prompts["test"]
    small = _dm(path, tok, seed=3, limit_train_samples=10, limit_eval_samples=5)
    assert [len(small.records(s)) for s in ("train", "validation", "test")] == [10, 5, 5]
    assert set(r.prompt for r in small.records("train")) <= set(prompts["train"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly once"):
        InstructionDataModule(template="no text here")
    with pytest.raises(ValueError, match="format must be"):
        InstructionDataModule(format="markdown")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes no data_files"):
        InstructionDataModule(data_files="x.jsonl").records("train")


def test_bbc_headlines_titles_answer_bodies_once():
    dm = InstructionDataModule()
    splits = {s: dm.records(s) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [1507, 167, 418]
    bodies = [r.prompt for v in splits.values() for r in v]
    assert len(bodies) == len(set(bodies)) == 2092
    first = splits["train"][0]
    assert first.answer and "\n" not in first.answer and first.answer not in first.prompt[: len(first.answer)]


def test_bigbench_generative_records_keep_every_target():
    data = {"examples": [{"input": "2 + 2 =", "target": "4"}, {"input": "capital of France?",
                                                              "target": ["Paris", "paris"]}]}
    assert generative_records("t", data) == [
        {"prompt": "2 + 2 =", "answer": "4", "references": ["4"]},
        {"prompt": "capital of France?", "answer": "Paris", "references": ["Paris", "paris"]}]
    with pytest.raises(ValueError, match="example 0: not a generative example"):
        generative_records("t", {"examples": [{"input": "x", "target_scores": {"a": 1}}]})
    with pytest.raises(ValueError, match="has no examples"):
        generative_records("t", {"examples": []})


def test_answer_positions_never_marks_the_last_position():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
    assert answer_positions(labels).tolist() == [[False, True, True, False], [True, True, False, False]]
