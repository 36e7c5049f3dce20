"""How much of the input text a curious server reads back from the activations it receives.

Setting (docs/threat-model.md, "What the server learns"): the server knows the public backbone
(SmolLM2-135M, the same weights as the device) and has public text of the domain. With ``select: all``
it receives, for every token of every training sample, the int8-quantised hidden state of each tapped
block. It fits a **linear probe** on activations of public text (here the BBC News train split, which it
runs through the public backbone itself, with the device's prompt and codec) that maps one tapped block's
state at a position to the input token id at that position, and applies it to what the devices send
(here the validation and test documents, never seen by the probe: the "private" text).

Probes, per tapped block (features: the decoded int8 state, divided by its RMS and centred):

* ``embed_nn``: a least-squares (ridge) map from the state to the input embedding of its token, fit on the
  public text, then the token whose (unit) input embedding has the largest cosine with the mapped state,
  over the **full** vocabulary (so it is not limited by the probe vocabulary); strongest on the first blocks,
  where the state is still close to the embedding;
* ``softmax``: multinomial logistic regression over the probe vocabulary (a linear layer, cross-entropy,
  AdamW on CPU, one epoch by default), started from the embedding map's scores; strongest past the first
  blocks;
* ``embed_nn_ctx``: ``embed_nn`` on the states of positions t-1, t and t+1 of the same block (the server
  receives every position under ``select: all``; deep blocks keep part of a token in the next position).

Each probe is linear in the state (a linear map, then an argmax), fit on public text only; the reported
accuracy of a block is the best of the probes run on it (``best``), a lower bound on what the server can do.

The probe vocabulary is the set of token ids seen in the probe's training text; ``coverage`` is the share
of evaluated tokens whose id is in it (a token outside it always counts as missed by the trained probes).
Only **text** tokens are scored: the prompt's own tokens (``Article:`` ... ``\\nTopic:``) are public.

Knob: a device may not send the first k blocks (``BackboneConfig.layers: [k, ..., 29]``). ``knob`` gives,
for each k, the best recovery over the probed blocks that are still sent (the attacker reads the most
revealing one). ``--fit-skips`` measures what the knob costs: it runs the quickstart recipe with the first
k blocks dropped (same seed, one run at a time) and reads its validation accuracy.

``select: loss`` (the PAE shortcut) sends one state per sample, at the loss token, which is the prompt's
last token (``:`` of ``Topic:``), a public token: no text token's own state is sent. What that state says
about the text is measured by ``loss_token_bag_of_words``: a ridge probe from the loss-token state of one
block to the set of text tokens of the document (precision of its 10 best guesses among content tokens:
alphabetic, 4 letters or more, in 2 or more and at most 10% of the public documents; against guessing the
10 most common content tokens for every document).

Everything runs on CPU; the backbone forward is the device's (bf16, right padding, max_length 128, the
quickstart's prompt and codec). The features of every block (about 4 GB in int8) take one forward pass over
about 2000 documents; ``--cache`` keeps them for the next run::

    python benchmarks/token_probe.py --cache --out benchmarks/results/token_probe.json
    # the knob's cost: quickstart runs (one at a time), added to the same file
    python benchmarks/token_probe.py --no-probe --fit-skips 0,8 --fit-select-loss --out benchmarks/results/token_probe.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Article: {text}\nTopic:"
QUICKSTART = Path("recipes") / "quickstart.yaml"


def _parse_ints(s: str) -> list[int]:
    s = s.strip()
    if not s:
        return []
    out: list[int] = []
    for part in s.split(","):
        if "-" in part.strip()[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s rss {_rss_mb():6.0f} MB] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ features
def prompt_spans(tokenizer, prompt: str) -> tuple[int, int]:
    """Number of tokens before and after the text in an encoded prompt (``encode_prompts``' layout)."""
    from lightning_mobillm.data.text_classification import encode_prompts

    a = encode_prompts(tokenizer, ["alpha"], prompt, 64)[0]
    b = encode_prompts(tokenizer, ["alpha beta gamma delta"], prompt, 64)[0]
    before = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    after = next(i for i in range(min(len(a), len(b))) if a[-1 - i] != b[-1 - i])
    return before, after


def doc_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def collect(bb, dataset_splits: list, max_tokens: int, layers: list[int], codec: str, seed: int,
            span: tuple[int, int], batch_size: int) -> dict:
    """Run the device's forward (``select: all``) over documents in a seeded order until ``max_tokens``
    tokens are collected; keep the codec round trip of the chosen layers' states.

    Returns ``q`` (int8 ``[N, L, d]``) and ``scale`` (float32 ``[N, L]``) for integer codecs, else ``x``
    (the decoded states in float16/float32); per token: ``token`` id, ``doc``, ``pos`` in the document,
    ``is_text`` (not a prompt token), ``is_loss`` (the document's last token, the one ``select: loss`` sends).
    """
    from lightning_mobillm.protocol.packing import pack_acts, unpack_acts

    slots = [bb.layers.index(i) for i in layers]
    docs = [(s, i) for s, split in enumerate(dataset_splits) for i in range(len(split))]
    order = [docs[j] for j in doc_order(len(docs), seed)]
    chosen, total = [], 0
    for s, i in order:
        n = len(dataset_splits[s].input_ids[i])
        if total + n > max_tokens:
            break
        chosen.append((s, i))
        total += n
    before, after = span
    qs, scales, xs, meta = [], [], [], {k: [] for k in ("token", "doc", "pos", "is_text", "is_loss")}
    integer = codec in ("int8", "int4")
    for b0 in range(0, len(chosen), batch_size):
        batch = chosen[b0:b0 + batch_size]
        seqs = [dataset_splits[s].input_ids[i] for s, i in batch]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), bb.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, :len(seq)] = torch.as_tensor(seq)
            mask[r, :len(seq)] = 1
        out = bb(ids, mask, select="all")
        tensors = pack_acts(out.acts, out.lengths, codec)
        acts, _ = unpack_acts(tensors, codec)  # float32 [N, 30, d]: what the server decodes
        acts = acts[:, slots]
        if integer:
            scale = tensors["acts.scale"][:, slots]
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            qs.append(torch.round(acts / safe.unsqueeze(-1)).to(torch.int8))
            scales.append(scale.clone())
        else:
            big = bool(acts.abs().amax() > 60000)
            xs.append(acts.to(torch.float32 if big else torch.float16))
        for r, seq in enumerate(seqs):
            n = len(seq)
            pos = torch.arange(n)
            meta["token"].append(torch.as_tensor(seq))
            meta["doc"].append(torch.full((n,), b0 + r))
            meta["pos"].append(pos)
            meta["is_text"].append((pos >= before) & (pos < n - after))
            meta["is_loss"].append(pos == n - 1)
        if (b0 // batch_size) % 20 == 0:
            log(f"  forward {b0 + len(batch)}/{len(chosen)} docs")
    res = {k: torch.cat(v) for k, v in meta.items()}
    if integer:
        res["q"], res["scale"] = torch.cat(qs), torch.cat(scales)
    else:
        res["x"] = torch.cat([x.float() for x in xs]).to(max((x.dtype for x in xs), key=lambda d: d.itemsize))
    res["n_docs"] = len(chosen)
    return res


def layer_features(feats: dict, j: int) -> torch.Tensor:
    """float32 ``[N, d]``: the decoded state of the j-th collected layer, divided by its RMS."""
    if "q" in feats:
        x = feats["q"][:, j].float() * feats["scale"][:, j, None]
    else:
        x = feats["x"][:, j].float()
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)


def with_context(x: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """``[N, 3d]``: the states of positions t-1, t, t+1 of the same document (zeros past its ends)."""
    prev = torch.zeros_like(x)
    nxt = torch.zeros_like(x)
    same_prev = doc[1:] == doc[:-1]
    prev[1:][same_prev] = x[:-1][same_prev]
    nxt[:-1][same_prev] = x[1:][same_prev]
    return torch.cat([prev, x, nxt], dim=1)


# ------------------------------------------------------------------------------------------- probes
def topk_hits(scores_fn, n: int, y: torch.Tensor, chunk: int = 4096, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-k hit masks of the scores ``scores_fn(slice)`` ``[n_chunk, V]`` against ``y``."""
    top1 = torch.zeros(n, dtype=torch.bool)
    topk = torch.zeros(n, dtype=torch.bool)
    for a in range(0, n, chunk):
        s = scores_fn(slice(a, a + chunk))
        idx = s.topk(k, dim=1).indices
        yy = y[a:a + chunk, None]
        top1[a:a + chunk] = idx[:, 0] == yy[:, 0]
        topk[a:a + chunk] = (idx == yy).any(1)
    return top1, topk


def embedding_map(x: torch.Tensor, target: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """``[d + 1, e]``: a ridge map (with a bias row) from the states ``x`` to ``target``, the unit input
    embeddings of their tokens (float32 products summed in float64 over blocks of 4096 rows)."""
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
    g = sum((x1[a:a + 4096].T @ x1[a:a + 4096]).double() for a in range(0, len(x1), 4096))
    xy = sum((x1[a:a + 4096].T @ target[a:a + 4096]).double() for a in range(0, len(x1), 4096))
    reg = lam * torch.trace(g) / g.shape[0] * torch.eye(g.shape[0], dtype=torch.float64)
    reg[-1, -1] = 0
    return torch.linalg.solve(g + reg, xy).float()


def nn_scores(x: torch.Tensor, m: torch.Tensor, emb_t: torch.Tensor):
    """Scores ``(x m) . e_v`` of every token ``v`` (``emb_t``: unit embeddings ``[e, vocab]``, bf16): the
    argmax is the nearest embedding by cosine to the mapped state (a bf16 matmul, float32 accumulation)."""
    return lambda sl: (torch.addmm(m[-1], x[sl], m[:-1]).bfloat16() @ emb_t).float()


def softmax_probe(x: torch.Tensor, y: torch.Tensor, V: int, init: torch.Tensor | None, epochs: int, lr: float,
                  batch: int, seed: int) -> torch.nn.Linear:
    """Multinomial logistic regression ``[d] -> V`` trained with AdamW (one-cycle schedule) from ``init``
    (``[d + 1, V]``, bias last), or from zero."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], V)
    with torch.no_grad():
        if init is not None:
            lin.weight.copy_(init[:-1].T)
            lin.bias.copy_(init[-1])
        else:
            lin.weight.zero_()
            lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for a in range(0, len(x), batch):
            idx = perm[a:a + batch]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = lin(x[idx])
            loss = torch.nn.functional.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    lin.eval()
    return lin


def accuracy(top1: torch.Tensor, top5: torch.Tensor, covered: torch.Tensor) -> dict:
    return {
        "top1": round(100 * float(top1.float().mean()), 2),
        "top5": round(100 * float(top5.float().mean()), 2),
        "top1_covered": round(100 * float(top1[covered].float().mean()), 2),
    }


def bag_of_words(tr_x, tr_docs_tokens, ev_x, ev_docs_tokens, V: int, content: torch.Tensor, k: int, seed: int) -> dict:
    """Ridge from one state per document to the multi-hot set of its text tokens; precision of the k best
    guesses among ``content`` token ids, against the k most frequent content tokens of the probe text."""
    def multihot(docs):
        y = torch.zeros(len(docs), V)
        for r, toks in enumerate(docs):
            y[r, toks] = 1.0
        return y

    ytr, yev = multihot(tr_docs_tokens), multihot(ev_docs_tokens)
    x1 = torch.cat([tr_x, torch.ones(len(tr_x), 1)], 1).double()
    g = x1.T @ x1
    xy = x1.T @ ytr.double()
    d = g.shape[0]
    best = None
    n = len(tr_x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, fit = perm[: n // 5], perm[n // 5:]
    for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        gf = x1[fit].T @ x1[fit]
        reg = lam * torch.trace(gf) / d * torch.eye(d, dtype=torch.float64)
        w = torch.linalg.solve(gf + reg, x1[fit].T @ ytr[fit].double()).float()
        s = (x1[held].float() @ w)[:, content]
        hit = ytr[held][:, content].gather(1, s.topk(k, dim=1).indices)
        p = float(hit.mean())
        if best is None or p > best[0]:
            best = (p, lam)
    lam = best[1]
    reg = lam * torch.trace(g) / d * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(g + reg, xy).float()
    ev1 = torch.cat([ev_x, torch.ones(len(ev_x), 1)], 1)
    s = (ev1 @ w)[:, content]
    prec = float(yev[:, content].gather(1, s.topk(k, dim=1).indices).mean())
    prior = ytr[:, content].sum(0).topk(k).indices
    prec_prior = float(yev[:, content][:, prior].mean())
    return {"precision_at_k": round(100 * prec, 2), "prior_precision_at_k": round(100 * prec_prior, 2),
            "k": k, "lambda": lam}


# ---------------------------------------------------------------------------------------- the probe
def run_probe(args) -> dict:
    from lightning_mobillm.backbone import FrozenBackbone
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.specs import BackboneConfig

    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    bb = FrozenBackbone(BackboneConfig(source=args.source, dtype=args.dtype, layers="all"))
    layers = list(range(bb.num_blocks)) if args.layers == "all" else _parse_ints(args.layers)
    dm = TextClassificationDataModule(dataset=args.dataset, prompt=args.prompt, max_length=args.max_length,
                                      val_fraction=0.1, test_fraction=0.2, seed=0)
    dm.set_tokenizer(bb.tokenizer)
    dm.setup("fit")
    dm.setup("test")
    span = prompt_spans(bb.tokenizer, args.prompt)
    log(f"loaded {bb}; prompt tokens before/after the text: {span}; probing blocks {layers}")

    t0 = time.perf_counter()
    cache = None
    if args.cache:
        from lightning_mobillm.assets import cache_dir

        key = "|".join(map(str, (args.source, args.dtype, args.codec, args.dataset, args.prompt, args.max_length,
                                 args.train_tokens, args.eval_tokens, args.seed, "v1")))
        cache = cache_dir() / "token_probe" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    from_cache = cache is not None and cache.exists()
    if from_cache:
        train, ev = torch.load(cache)
        log(f"features from {cache}")
    else:
        blocks = list(range(bb.num_blocks))  # every block (a few GB in int8), probed as --layers says
        train = collect(bb, [dm.split_dataset("train")], args.train_tokens, blocks, args.codec, args.seed, span,
                        args.batch_size)
        ev = collect(bb, [dm.split_dataset("validation"), dm.split_dataset("test")], args.eval_tokens, blocks,
                     args.codec, args.seed + 1, span, args.batch_size)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((train, ev), cache)
    forward_s = time.perf_counter() - t0
    log(f"features: {len(train['token'])} public tokens ({train['n_docs']} docs), {len(ev['token'])} private "
        f"tokens ({ev['n_docs']} docs) in {forward_s:.0f}s")
    emb = bb.model.get_input_embeddings().weight.detach().float()
    emb_n = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-6)
    loss_token_ids = sorted(set(ev["token"][ev["is_loss"]].tolist()))
    bb.close()

    tr_text, ev_text = train["is_text"], ev["is_text"]
    vocab = torch.unique(train["token"][tr_text])
    V = len(vocab)
    to_class = torch.full((int(max(train["token"].max(), ev["token"].max())) + 1,), -1, dtype=torch.long)
    to_class[vocab] = torch.arange(V)
    y_tr = to_class[train["token"][tr_text]]
    y_ev = to_class[ev["token"][ev_text]]
    covered = y_ev >= 0
    y_ev_true = ev["token"][ev_text]
    coverage = float(covered.float().mean())
    # the loss token (select: loss): the prompt's last token of every document
    ev_loss = ev["is_loss"]
    log(f"probe vocabulary {V} ids; coverage of the private text tokens {100 * coverage:.2f}%")

    # bag of words for select: loss: per document, its set of text-token classes
    def doc_tokens(f):
        out = []
        for dnum in range(f["n_docs"]):
            m = (f["doc"] == dnum) & f["is_text"]
            c = to_class[f["token"][m]]
            out.append(torch.unique(c[c >= 0]))
        return out

    tr_docs, ev_docs = doc_tokens(train), doc_tokens(ev)
    df = torch.zeros(V)
    for t in tr_docs:
        df[t] += 1
    # content tokens: seen in >= 2 and at most 10% of the public documents, decoded to a word of >= 4 letters
    words = [dm.tokenizer.decode([int(t)]).strip() for t in vocab]
    content = torch.tensor([i for i, w in enumerate(words)
                            if w.isalpha() and len(w) >= 4 and 2 <= df[i] <= 0.1 * len(tr_docs)])

    emb_t = emb_n.T.bfloat16().contiguous()  # [e, vocab]: every token id, not only the probe's vocabulary
    emb_v = emb_n[vocab]  # [V, e]: the probe vocabulary's unit embeddings
    methods = ("embed_nn", "embed_nn_ctx", "softmax")
    per_layer: dict[str, dict] = {}
    for layer in layers:
        tl = time.perf_counter()
        xtr_all, xev_all = layer_features(train, layer), layer_features(ev, layer)  # every block, in order
        mu = xtr_all[tr_text].mean(0)
        xtr_all -= mu
        xev_all -= mu
        xtr, xev = xtr_all[tr_text], xev_all[ev_text]
        row: dict = {}
        m = embedding_map(xtr, emb_n[train["token"][tr_text]])
        t1, t5 = topk_hits(nn_scores(xev, m, emb_t), len(xev), y_ev_true)
        row["embed_nn"] = {**accuracy(t1, t5, covered), "seconds": round(time.perf_counter() - tl, 1)}
        # select: loss sends one state per sample, the prompt's last token's: does the same probe name it?
        xl = xev_all[ev_loss]
        lt1, _ = topk_hits(nn_scores(xl, m, emb_t), len(xl), ev["token"][ev_loss], k=1)
        row["loss_token_top1"] = round(100 * float(lt1.float().mean()), 2)
        if layer in args.context_layers_set:
            tm = time.perf_counter()
            ctr = with_context(xtr_all, train["doc"])[tr_text]
            cev = with_context(xev_all, ev["doc"])[ev_text]
            mc = embedding_map(ctr, emb_n[train["token"][tr_text]])
            t1c, t5c = topk_hits(nn_scores(cev, mc, emb_t), len(cev), y_ev_true)
            row["embed_nn_ctx"] = {**accuracy(t1c, t5c, covered), "seconds": round(time.perf_counter() - tm, 1)}
            del ctr, cev, mc
        if layer in args.softmax_layers_set:
            tm = time.perf_counter()
            init = args.init_scale * (m @ emb_v.T)  # start from the embedding map's scores over the vocabulary
            lin = softmax_probe(xtr, y_tr, V, init, args.epochs, args.lr, args.probe_batch, args.seed)
            with torch.no_grad():
                t1s, t5s = topk_hits(lambda sl, lin=lin, x=xev: lin(x[sl]), len(xev), y_ev)
            row["softmax"] = {**accuracy(t1s, t5s, covered), "seconds": round(time.perf_counter() - tm, 1)}
            del lin, init
        # select: loss, what the loss-token state says about the whole text
        row["loss_token_bag_of_words"] = bag_of_words(
            xtr_all[train["is_loss"]], tr_docs, xev_all[ev_loss], ev_docs, V, content, args.bow_k, args.seed)
        best_m = max((k for k in methods if k in row), key=lambda k: row[k]["top1"])
        row["best"] = {"method": best_m, "top1": row[best_m]["top1"], "top5": row[best_m]["top5"]}
        row["seconds"] = round(time.perf_counter() - tl, 1)
        per_layer[str(layer)] = row
        log(f"block {layer:2d}: " + ", ".join(f"{k} {row[k]['top1']:.1f}" for k in methods if k in row)
            + f" | loss token {row['loss_token_top1']:.0f} | loss-token bag of words p@{args.bow_k} "
            f"{row['loss_token_bag_of_words']['precision_at_k']:.1f} "
            f"(prior {row['loss_token_bag_of_words']['prior_precision_at_k']:.1f}) [{row['seconds']}s]")
        del xtr_all, xev_all, xtr, xev, m

    knob = []
    for k in args.skips:
        sent = [lay for lay in layers if lay >= k]
        if not sent:
            continue
        best_l = max(sent, key=lambda lay: per_layer[str(lay)]["best"]["top1"])
        same_method = {m: max((per_layer[str(lay)][m]["top1"] for lay in sent if m in per_layer[str(lay)]),
                              default=None) for m in methods}
        knob.append({"skip_first": k, "layers_sent": f"{k}..{bb.num_blocks - 1}", "probed_blocks_sent": sent,
                     "best_block": best_l, "best_method": per_layer[str(best_l)]["best"]["method"],
                     "best_top1": per_layer[str(best_l)]["best"]["top1"],
                     "best_top5": per_layer[str(best_l)]["best"]["top5"],
                     "best_top1_by_method": same_method})

    n_ev_docs = ev["n_docs"]
    text_per_doc = float(ev_text.sum()) / n_ev_docs
    return {
        "probe_seconds": round(time.perf_counter() - t_start, 1),
        "forward_seconds": round(forward_s, 1),
        "features_from_cache": from_cache,
        "tokens": {
            "public_docs": train["n_docs"], "public_tokens": len(train["token"]),
            "public_text_tokens": int(tr_text.sum()),
            "private_docs": n_ev_docs, "private_tokens": len(ev["token"]),
            "private_text_tokens": int(ev_text.sum()),
            "prompt_tokens_before_after_text": list(span),
        },
        "probe_vocabulary": V,
        "coverage": round(100 * coverage, 2),
        "per_layer": per_layer,
        "knob": knob,
        "select_loss": {
            "tokens_sent_per_sample": 1,
            "loss_token_ids": loss_token_ids,
            "loss_token": [dm.tokenizer.decode([t]) for t in loss_token_ids],
            "text_tokens_sent_per_sample": 0,
            "mean_text_tokens_per_sample": round(text_per_doc, 1),
            "share_of_sequence_sent": round(100 * n_ev_docs / len(ev["token"]), 2),
            "content_tokens_for_bag_of_words": len(content),
        },
    }


# -------------------------------------------------------------------------------- accuracy cost (fit)
def run_fit(skip: int, args, select: str = "all") -> dict:
    """The quickstart recipe with the first ``skip`` blocks not tapped (and ``select``); its last validation
    accuracy."""
    import lightning_mobillm

    root = Path(lightning_mobillm.__file__).resolve().parents[1]  # the checkout whose library is imported
    layers = "all" if skip == 0 else "[" + ",".join(str(i) for i in range(skip, 30)) + "]"
    workdir = Path(tempfile.mkdtemp(prefix=f"token_probe_fit{skip}{select}_", dir=args.fit_dir))
    cmd = [sys.executable, "-m", "lightning_mobillm", "fit", "--config", str(root / QUICKSTART),
           "--model.init_args.backbone.layers", layers, *shlex.split(args.fit_extra)]
    cmd += ["--trainer.strategy.init_args.select", select]  # the quickstart's own is auto
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    log(f"fit, first {skip} blocks dropped, select {select}: {' '.join(shlex.quote(c) for c in cmd)} (in {workdir})")
    with open(workdir / "fit.log", "w") as logf:
        rc = subprocess.run(cmd, cwd=workdir, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"fit with skip {skip}, select {select} failed (exit {rc}); see {workdir / 'fit.log'}")
    return {"skip_first": skip, "select": select, "layers": layers, **read_fit(workdir), "wall_seconds": round(wall, 1),
            "command": " ".join(shlex.quote(c) for c in cmd[1:])}


def read_fit(workdir: Path) -> dict:
    import csv

    metrics = sorted(workdir.glob("**/metrics.csv"))[-1]
    vals = [r for r in csv.DictReader(open(metrics)) if r.get("val/acc")]
    last = vals[-1]
    out = {"val_acc": round(100 * float(last["val/acc"]), 2), "epoch": int(last["epoch"]), "step": int(last["step"])}
    if last.get("val/f1"):
        out["val_macro_f1"] = round(100 * float(last["val/f1"]), 2)
    summary = metrics.parent / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        for key in ("steps", "train_samples", "bytes_up_per_sample", "device_peak_rss_mb", "wall_s"):
            if key in s:
                out[key] = s[key]
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "token_probe.json"))
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", help="the device's forward dtype (the quickstart's)")
    p.add_argument("--codec", default="int8", choices=("int8", "int4", "fp16", "bf16", "fp32", "int8o", "int4o"),
                   help="the wire codec whose round trip the probe sees (the quickstart's: int8)")
    p.add_argument("--dataset", default="bbc_news")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--layers", default="0,1,2,3,4,6,8,12,16,20,25,29",
                   help="blocks to probe (embed_nn): 'all' or a list such as 0-3,8,29")
    p.add_argument("--softmax-layers", default="4,8,12,16,29",
                   help="blocks that also get the AdamW softmax probe ('all' or a list; 1-2 min each)")
    p.add_argument("--context-layers", default="8,29", help="blocks that also get embed_nn_ctx (t-1, t, t+1)")
    p.add_argument("--skips", default="0,4,8,12,16", help="k values of the knob table (best over the "
                   "probed blocks >= k; give k that are probed blocks)")
    p.add_argument("--train-tokens", type=int, default=200_000, help="public tokens the probe is fitted on")
    p.add_argument("--eval-tokens", type=int, default=50_000, help="private tokens it is evaluated on")
    p.add_argument("--epochs", type=int, default=1, help="softmax probe epochs")
    p.add_argument("--init-scale", type=float, default=20.0,
                   help="the softmax probe starts from this times the embedding map's cosine-like scores")
    p.add_argument("--lr", type=float, default=2e-3, help="softmax probe AdamW learning rate")
    p.add_argument("--probe-batch", type=int, default=1024)
    p.add_argument("--bow-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="documents per backbone forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", action="store_true",
                   help="keep the collected features in the library's cache folder (token_probe/, ~4 GB) and reuse them")
    p.add_argument("--no-probe", action="store_true", help="skip the probe, keep the probe part of --out")
    p.add_argument("--fit-skips", default="", help="run the quickstart with these k (e.g. 0,8) for the knob's cost")
    p.add_argument("--fit-extra", default="", help="extra CLI overrides for every fit run (same for all k)")
    p.add_argument("--fit-dir", default=None, help="where fit runs write their run folders (default: a temp dir)")
    p.add_argument("--fit-from", default="", help="K=RUN_FOLDER,...: read the accuracy of a quickstart run already "
                   "made with the first K blocks dropped (its CSV logger folder) instead of running it")
    p.add_argument("--fit-keep", action="store_true", help="keep the fit rows already in --out and add to them")
    p.add_argument("--fit-select-loss", action="store_true",
                   help="also run the quickstart with every block tapped and select: loss (one token per sample)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    all_blocks = list(range(30))
    layers = all_blocks if args.layers == "all" else _parse_ints(args.layers)

    def subset(s: str) -> set[int]:
        return set(layers) if s == "all" else set(_parse_ints(s))

    args.softmax_layers_set = subset(args.softmax_layers)
    args.context_layers_set = subset(args.context_layers)
    args.skips = _parse_ints(args.skips)

    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "lightning", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    import lightning_mobillm

    def head(folder: Path) -> str:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip()

    lib_root = Path(lightning_mobillm.__file__).resolve().parents[1]
    commit, lib_commit = head(REPO), head(lib_root)
    run_info = {"command": "python benchmarks/token_probe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                "commit": commit, "library_commit": lib_commit, "versions": versions, "threads": args.threads, "machine": platform.machine(),
                "cpus": os.cpu_count()}
    if not args.no_probe:
        cfg = {k: getattr(args, k) for k in ("source", "dtype", "codec", "dataset", "prompt", "max_length",
                                             "train_tokens", "eval_tokens", "epochs", "lr", "probe_batch", "seed",
                                             "bow_k", "init_scale")}
        cfg.update(layers=layers, softmax_layers=sorted(args.softmax_layers_set),
                   context_layers=sorted(args.context_layers_set),
                   skips=args.skips, select="all", public_text="train split (1602 docs)",
                   private_text="validation + test splits (623 docs), a seeded sample")
        result = {"probe_run": run_info, "config": cfg, **run_probe(args),
                  **{k: result[k] for k in ("accuracy_cost", "fit_runs") if k in result}}
    if args.fit_skips or args.fit_from or args.fit_select_loss:
        cost = [c for c in result.get("accuracy_cost", []) if args.fit_keep]
        for item in filter(None, args.fit_from.split(",")):
            k, folder = item.split("=", 1)
            cost.append({"skip_first": int(k), "select": "all", **read_fit(Path(folder)), "from_existing_run": folder})
        cost += [run_fit(k, args) for k in _parse_ints(args.fit_skips)]
        if args.fit_select_loss:
            cost.append(run_fit(0, args, select="loss"))
        cost.sort(key=lambda c: (c["select"] != "all", c["skip_first"]))
        base = next((c["val_acc"] for c in cost if c["skip_first"] == 0 and c["select"] == "all"), None)
        for c in cost:
            c["val_acc_change"] = None if base is None else round(c["val_acc"] - base, 2)
        result["accuracy_cost"] = cost
        result["fit_runs"] = (result.get("fit_runs", []) if args.fit_keep else []) + [
            {**run_info, "recipe": "recipes/quickstart.yaml", "seed": 0, "extra": args.fit_extra}]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
