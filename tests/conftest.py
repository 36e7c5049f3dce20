"""Shared fixtures: tiny random backbones built from configs, a tiny word-level tokenizer, tiny data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

TOPICS = {
    "sport": "match goal team coach player league score win season cup",
    "tech": "software chip phone network data computer internet code robot cloud",
    "money": "bank market price shares profit economy trade tax growth stocks",
}
FILLER = "the a of and to in on with for said today new year people".split()


def tiny_tokenizer():
    """A word-level fast tokenizer over the words used by :func:`write_tiny_dataset`.

    The class names (the keys of ``TOPICS``) are words of their own, last in the vocabulary: PAE's
    verbalizer (``FrozenBackbone.verbalizer_token_ids``) tokenizes ``" " + name``, which the whitespace
    pre-tokenizer turns into ``name``, so each class gets its own token and the backbone's prior over the
    classes is a real distribution rather than the same ``[UNK]`` logit three times. The class names never
    occur in the texts, so the data's token ids are the same as without them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ws in TOPICS.values() for w in ws.split()} | set(FILLER) | {"Article", "Topic", ":"})
    assert not set(TOPICS) & set(words)  # a class name inside the texts would make the prior trivial
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", *words, *TOPICS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def write_tiny_dataset(path: Path, n: int = 180, seed: int = 0) -> Path:
    """JSON lines with ``text``/``label`` (string labels), learnable from the topic words."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    with path.open("w") as f:
        for i in range(n):
            label = names[i % len(names)]
            words = [rng.choice(TOPICS[label].split()) for _ in range(rng.randint(3, 8))]
            words += [rng.choice(FILLER) for _ in range(rng.randint(2, 10))]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def build_tiny_model(kind: str):
    """A tiny random model of the given family, built from a config (no download)."""
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        BertConfig,
        Gemma3TextConfig,
        LlamaConfig,
        Qwen2Config,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    if kind == "llama":
        return AutoModelForCausalLM.from_config(LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0))
    if kind == "qwen2":
        return AutoModelForCausalLM.from_config(Qwen2Config(**common, num_key_value_heads=2, pad_token_id=0))
    if kind == "gemma3":
        return AutoModelForCausalLM.from_config(
            Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, pad_token_id=0)
        )
    if kind == "bert":
        return AutoModel.from_config(BertConfig(**common, pad_token_id=0))
    raise ValueError(kind)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``). The
    models here are tiny: with two threads on a shared two-core machine a small op spends most of its time
    in OpenMP barriers (a 16-wide side-network step took 0.8 s instead of a few ms)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_seed_env(monkeypatch):
    """``seed_everything`` writes ``PL_GLOBAL_SEED``/``PL_SEED_WORKERS`` into the environment: put them back
    after the test, so that one test's seed never leaks into the next."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.setenv("PL_SEED_WORKERS", "0")


@pytest.fixture(scope="session")
def word_tokenizer():
    """:func:`tiny_tokenizer`, built once per session."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama with the tiny tokenizer: a ``BackboneConfig.source`` folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.jsonl")


@pytest.fixture
def tiny_gemma_dir(tmp_path, tiny_llama_dir) -> Path:
    """A tiny random Gemma 3 of another width and depth than the tiny Llama (48 x 6 against 32 x 4), with the
    same word-level tokenizer. (Not a Qwen2: transformers loads any tokenizer beside a ``qwen2`` config as its
    own ``Qwen2Tokenizer``, which turns the tiny vocabulary's class names into nothing.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    folder = tmp_path / "tiny-gemma3"
    torch.manual_seed(1)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=48, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=12, intermediate_size=96, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def wire(monkeypatch) -> list[tuple[bytes, bytes]]:
    """Every (request, reply) through an in-process link, in the order the replies came back."""
    from lightning_mobillm.transport.link import InProcessLink

    calls: list[tuple[bytes, bytes]] = []
    original = InProcessLink.call

    def tapped(self, request: bytes) -> bytes:
        reply = original(self, request)
        calls.append((request, reply))
        return reply

    monkeypatch.setattr(InProcessLink, "call", tapped)
    return calls
