"""The logic of benchmarks/token_probe.py on synthetic data (no backbone, no forward): the probes find a
linear code, context features stop at document ends, the bag-of-words probe beats its prior only when the
state carries the words, fit results are read from a run folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("bench_token_probe", REPO / "benchmarks" / "token_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_ints(tp):
    assert tp._parse_ints("0-3,8, 29") == [0, 1, 2, 3, 8, 29]
    assert tp._parse_ints("") == []


def test_with_context_stops_at_document_ends(tp):
    x = torch.arange(5.0).unsqueeze(1)  # one feature: the row index
    doc = torch.tensor([0, 0, 0, 1, 1])
    c = tp.with_context(x, doc)
    assert c[:, 1].tolist() == [0, 1, 2, 3, 4]  # the position itself
    assert c[:, 0].tolist() == [0, 0, 1, 0, 3]  # t-1, zero at each document's first token
    assert c[:, 2].tolist() == [1, 2, 0, 4, 0]  # t+1, zero at each document's last token


def test_embedding_map_reads_a_linear_code_and_misses_noise(tp):
    g = torch.Generator().manual_seed(0)
    vocab, e, d, n = 300, 16, 24, 6000
    emb = torch.randn(vocab, e, generator=g)
    emb = emb / emb.norm(dim=1, keepdim=True)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    mix = torch.randn(e, d, generator=g)
    states = emb[tokens] @ mix + 0.01 * torch.randn(n, d, generator=g)
    m = tp.embedding_map(states[:5000], emb[tokens[:5000]])
    top1, top5 = tp.topk_hits(tp.nn_scores(states[5000:], m, emb.T.bfloat16()), 1000, tokens[5000:])
    assert top1.float().mean() > 0.95 and bool((top5 | ~top1).all())
    # states that do not depend on the token: chance level
    noise = torch.randn(n, d, generator=g)
    m = tp.embedding_map(noise[:5000], emb[tokens[:5000]])
    top1, _ = tp.topk_hits(tp.nn_scores(noise[5000:], m, emb.T.bfloat16()), 1000, tokens[5000:])
    assert top1.float().mean() < 0.05


def test_softmax_probe_learns_from_zero(tp):
    g = torch.Generator().manual_seed(1)
    classes, d = 20, 32
    centres = 3 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (4000,), generator=g)
    x = centres[y] + torch.randn(4000, d, generator=g)
    lin = tp.softmax_probe(x[:3000], y[:3000], classes, None, epochs=3, lr=1e-2, batch=256, seed=0)
    with torch.no_grad():
        top1, _ = tp.topk_hits(lambda sl: lin(x[3000:][sl]), 1000, y[3000:])
    assert top1.float().mean() > 0.9


def test_bag_of_words_beats_the_prior_only_with_signal(tp):
    g = torch.Generator().manual_seed(2)
    vocab, d, docs = 60, 40, 600
    words = [torch.randperm(vocab, generator=g)[:8] for _ in range(docs)]
    code = torch.randn(vocab, d, generator=g)
    with_signal = torch.stack([code[w].sum(0) for w in words])
    content = torch.arange(vocab)
    good = tp.bag_of_words(with_signal[:500], words[:500], with_signal[500:], words[500:], vocab, content, 5, 0)
    assert good["precision_at_k"] > good["prior_precision_at_k"] + 30
    noise = torch.randn(docs, d, generator=g)
    bad = tp.bag_of_words(noise[:500], words[:500], noise[500:], words[500:], vocab, content, 5, 0)
    assert bad["precision_at_k"] < bad["prior_precision_at_k"] + 10


def test_read_fit_takes_the_last_validation(tp, tmp_path):
    run = tmp_path / "runs" / "quickstart" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "epoch,step,train/loss_step,val/acc,val/f1\n0,9,1.2,,\n0,100,,0.5,0.4\n0,200,,0.92134,0.91\n")
    (run / "summary.json").write_text(json.dumps({"steps": 201, "wall_s": 12.5, "other": 1}))
    out = tp.read_fit(tmp_path)
    assert out["val_acc"] == 92.13 and out["val_macro_f1"] == 91.0 and out["step"] == 200
    assert out["steps"] == 201 and "other" not in out
