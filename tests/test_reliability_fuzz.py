"""A derandomized slice of ``benchmarks/reliability.py``'s fuzzer, run in-process against a ``SideServer``.

Each slice sends a few hundred structure-aware mutations of valid frames (drawn by hypothesis with
``derandomize=True``, so every run sends the same frames) and asserts that every frame the reference checker
(``reliability.Oracle``) calls invalid is refused, that no refused frame changes any session's state (weights,
optimizer, scheduler, step, secret, restore window, stored retry reply, cache keys, open sessions), and that the
mutated session still trains the next valid frame. Unmutated control frames of every kind must be accepted.

The tests after the slices reproduce, one by one, what earlier runs of the fuzzer found (set_state's nested
state taken unchecked, a failing optimizer step left half-applied), so that each stays fixed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("reliability_benchmark", REPO / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


R = _load_benchmark()


SLICES = {
    "every kind, every operator": dict(frames=150),
    "training frames": dict(frames=120, kinds=("train", "train_target", "train_cached", "eval"),
                            ops=("tensor.dtype", "tensor.shape", "tensor.rank", "tensor.extra", "tensor.drop",
                                 "tensor.nonfinite", "tensor.values", "keys.mutate", "step.shift", "seq.replay_older",
                                 "seq.retry_last", "count.oversized", "codec.change", "header.smuggle",
                                 "session.stolen_pair", "session.stale_secret")),
    "hello and set_state": dict(frames=120, kinds=("hello", "set_state"),
                                ops=tuple(op for op in R.OPS if op.split(".")[0] in ("hello", "state", "header"))),
    "bytes": dict(frames=100, ops=tuple(op for op in R.OPS if op.startswith("bytes."))),
}


@pytest.mark.parametrize("name", list(SLICES))
def test_fuzz_slice(tmp_path, name):
    spec = SLICES[name]
    out = R.run_fuzz(R.InProcessTarget(tmp_path), spec["frames"], derandomize=True, kinds=spec.get("kinds"),
                     ops=spec.get("ops"))
    assert out["controls"]["accepted"] == out["controls"]["judged_valid"] == out["controls"]["frames"]
    assert out["harness_errors"] == 0, out["harness_error_examples"]
    assert out["frames"] >= 0.9 * spec["frames"] and out["refused"] >= 0.5 * out["frames"]
    assert out["next_valid_trained"] + out["next_valid_failed"] == out["frames"]
    assert not out["findings"], out["findings"]


# ---- the findings, reproduced one by one -----------------------------------------------------------------
@pytest.fixture
def fz(tmp_path):
    fuzzer = R.Fuzzer(R.InProcessTarget(tmp_path))
    for s in fuzzer.sessions:
        fuzzer.open(s)
    fuzzer.snapshot()
    return fuzzer


def _session(fz, name: str):
    return next(s for s in fz.sessions if s.spec.name == name)


def _send(fz, sess, header: dict, tensors: dict | None = None):
    kind, h, _, _ = fz.send(R.raw_encode(header, tensors or {}), sess.identity)
    return kind, h


def _set_state(fz, sess, state):
    """A sender of a set_state frame, after the hello that opens the restore window."""
    fz.reconnect(sess)
    skeleton, blob = fz.P.pack_state(state)
    header = {"kind": "set_state", "session": sess.key, "secret": sess.secret, "skeleton": skeleton}
    return lambda: _send(fz, sess, header, {"state": blob})


def _refused_and_unchanged(fz, frame_sender) -> None:
    before = fz.snapshot()
    kind, h = frame_sender()
    after = fz.snapshot()
    changes = fz.changes(before, after, set())
    assert kind != "ok", f"accepted: {h}"
    assert not changes, f"refused ({h.get('message')}) but changed {changes}"


@pytest.mark.parametrize("key", ["a b", "x/y", "é"])
def test_a_cache_key_outside_the_alphabet_is_refused_before_training(fz, key):
    pae = _session(fz, "pae")

    def send():
        ctx = fz.build(pae, "train_target", seed=1)
        ctx.header["keys"] = [key, *ctx.header["keys"][1:]]
        return _send(fz, pae, ctx.header, ctx.tensors)

    _refused_and_unchanged(fz, send)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_set_state_refuses_non_finite_or_huge_weights(fz, value):
    lab = _session(fz, "lab")
    state = fz.get_state(lab)
    name = sorted(state["model"])[0]
    state["model"][name] = torch.full_like(state["model"][name], value)
    _refused_and_unchanged(fz, _set_state(fz, lab, state))


def test_a_failing_optimizer_step_is_rolled_back(fz):
    bobc = _session(fz, "bobc")
    engine = fz.target.server.sessions[bobc.key].model  # the in-process session's engine, put in that state directly
    first = next(p for g in engine.optimizer.param_groups for p in g["params"])
    engine.optimizer.state[first]["step"] = torch.tensor(-5.0)

    def train():
        ctx = fz.build(bobc, "train", seed=5)
        return _send(fz, bobc, ctx.header, ctx.tensors)

    _refused_and_unchanged(fz, train)


@pytest.mark.parametrize("step", ["3", 2**70])
def test_set_state_refuses_a_step_that_is_not_an_int(fz, step):
    lab = _session(fz, "lab")
    state = {**fz.get_state(lab), "step": step}
    _refused_and_unchanged(fz, _set_state(fz, lab, state))


@pytest.mark.parametrize("mutation", ["foreign_key", "negative_exp_avg_sq", "negative_adam_step", "eps_zero", "lr_true",
                                      "lr_huge", "maximize_string", "negative_last_epoch"])
def test_set_state_checks_the_optimizer_and_scheduler_state(fz, mutation):
    lab = _session(fz, "lab")
    state = fz.get_state(lab)
    opt = state["optimizer"]
    if mutation == "foreign_key":
        opt["foreign"] = 5
    elif mutation == "negative_exp_avg_sq":
        moment = next(iter(opt["state"].values()))
        moment["exp_avg_sq"] = -moment["exp_avg_sq"] - 1
    elif mutation == "eps_zero":
        opt["param_groups"][0]["eps"] = 0.0
    elif mutation == "lr_true":
        opt["param_groups"][0]["lr"] = True
    elif mutation == "lr_huge":
        opt["param_groups"][0]["lr"] = 1e308
    elif mutation == "negative_adam_step":
        next(iter(opt["state"].values()))["step"] = torch.tensor(-5.0)
    elif mutation == "negative_last_epoch":
        state["scheduler"]["last_epoch"] = -5
    else:
        opt["param_groups"][0]["maximize"] = "yes"
    _refused_and_unchanged(fz, _set_state(fz, lab, state))


@pytest.mark.parametrize("change", [{"labels": [0, 1, 2]}, {"text": "a private sentence"}, {"hidden_size": "16"},
                                    {"is_decoder": "no"}, {"layers": ["0", "1", "2"]}])
def test_hello_tap_spec_refuses_unknown_keys_and_other_types(fz, change):
    pae = _session(fz, "pae")
    header = R.hello_header(pae.spec)
    header.update(run_id="fresh", tap_spec={**header["tap_spec"], **change})
    header.pop("cache")
    _refused_and_unchanged(fz, lambda: _send(fz, pae, header))


@pytest.mark.parametrize(("what", "change"), [("hparams", {"lr_scheduler": "x"}), ("hparams", {"betas": 0}),
                                              ("side", {"class_path": "os.system"}), ("side", {"dropout": "x"})])
def test_a_reconnect_hello_is_validated_like_a_new_one(fz, what, change):
    lab = _session(fz, "lab")
    header = R.hello_header(lab.spec)
    header[what] = {**header[what], **change}

    def send():
        kind, h = _send(fz, lab, header)
        if kind == "ok":  # the reconnect renewed the secret: keep the fuzzer's view current
            lab.secret = h["secret"]
        return kind, h

    _refused_and_unchanged(fz, send)


def test_a_fresh_hello_refuses_what_a_reconnect_takes(fz):
    """The same malformed hparams on a new run are refused: the gap is the reconnect path only."""
    lab = _session(fz, "lab")
    header = R.hello_header(lab.spec)
    header.update(run_id="fresh", hparams={**header["hparams"], "lr_scheduler": "x"})
    kind, h = _send(fz, lab, header)
    assert kind == "error" and "lr_scheduler" in h["message"]
