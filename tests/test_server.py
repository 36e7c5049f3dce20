"""The server runtime against good and malformed frames, and the gRPC link's token check."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.server.runtime import SideServer
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig, TapSpec
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame
from lightning_mobillm.transport.link import GrpcLink, LinkError, serve_link

SPEC = TapSpec(layers=[0, 1, 2], hidden_size=16, arch="llama", is_decoder=True)
NUM_CLASSES = 3


def _hello(total_steps: int = 50) -> Frame:
    module = SideTuningModule(backbone=BackboneConfig(source="unused"), num_classes=NUM_CLASSES, lr=1e-2, dropout=0.0, seed=0)
    return Frame(
        kind=P.HELLO,
        header={
            "protocol": P.PROTOCOL_VERSION,
            "device_id": "dev",
            "run_id": "r1",
            "module": "side_tuning",
            "hparams": P.json_safe(module.hparams_dict()),
            "tap_spec": SPEC.to_dict(),
            "num_outputs": NUM_CLASSES,
            "total_steps": total_steps,
            "codec": "int8",
        },
    )


def _call(server: SideServer, frame: Frame | bytes) -> Frame:
    data = frame if isinstance(frame, bytes) else encode_frame(frame)
    return decode_frame(server.handle(data), P.REPLY_SCHEMAS, require_finite=False)


def _batch(seed: int, batch: int = 6, tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    centroids = torch.randn(NUM_CLASSES, 16, generator=torch.Generator().manual_seed(99)) * 3
    acts = torch.randn(batch * tokens, 3, 16, generator=g)
    acts[:, :, :] += centroids[labels].repeat_interleave(tokens, 0)[:, None, :]
    return acts, torch.full((batch,), tokens), labels


def _train_frame(session: str, step: int, seed: int, codec: str = "int8", **override) -> Frame:
    acts, lengths, labels = _batch(seed)
    tensors = {**P.pack_acts(acts, lengths, codec), "labels": labels, **override}
    return Frame(kind=P.TRAIN, header={"session": session, "step": step, "codec": codec}, tensors=tensors)


@pytest.fixture
def server_and_session():
    server = SideServer(ServerConfig(device="cpu"))
    reply = _call(server, _hello())
    assert reply.kind == P.OK
    return server, reply.header["session"]


def _snapshot(server: SideServer, session: str):
    s = server.sessions[session]
    return (
        {k: v.clone() for k, v in s.module.state_dict().items()},
        copy.deepcopy(s.optimizer.state_dict()),
        s.step,
    )


def _assert_unchanged(before, after) -> None:
    (m0, o0, s0), (m1, o1, s1) = before, after
    assert s0 == s1
    assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert o0["param_groups"] == o1["param_groups"]
    assert o0["state"].keys() == o1["state"].keys()


def test_training_frames_reduce_the_loss(server_and_session):
    server, session = server_and_session
    losses = []
    for step in range(40):
        reply = _call(server, _train_frame(session, step, seed=step))
        assert reply.kind == P.OK, reply.header
        assert reply.header["step"] == step
        losses.append(reply.header["loss"])
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert server.sessions[session].step == 40


def test_retried_frame_is_not_applied_twice(server_and_session):
    server, session = server_and_session
    first = server.handle(encode_frame(_train_frame(session, 0, seed=0)))
    before = _snapshot(server, session)
    again = server.handle(encode_frame(_train_frame(session, 0, seed=0)))
    assert again == first
    _assert_unchanged(before, _snapshot(server, session))


def _garbage_frames(session: str) -> dict[str, bytes | Frame]:
    acts, lengths, labels = _batch(1)
    nan_acts = acts.clone()
    nan_acts[0, 0, 0] = float("nan")
    good = encode_frame(_train_frame(session, 0, seed=1))
    return {
        "random bytes": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
        "truncated": good[: len(good) // 2],
        "wrong width": _train_frame(session, 0, 1, **P.pack_acts(torch.randn(18, 3, 8), lengths, "int8")),
        "wrong layer count": _train_frame(session, 0, 1, **P.pack_acts(torch.randn(18, 2, 16), lengths, "int8")),
        "wrong dtype": _train_frame(session, 0, 1, **{"acts.q": torch.zeros(18, 3, 16, dtype=torch.int32)}),
        "nan in fp32 acts": _train_frame(session, 0, 1, codec="fp32", **P.pack_acts(nan_acts, lengths, "fp32")),
        "lengths do not sum": _train_frame(session, 0, 1, lengths=torch.full((6,), 2)),
        "label out of range": _train_frame(session, 0, 1, labels=torch.full((6,), 7)),
        "forbidden field": _train_frame(session, 0, 1, input_ids=torch.zeros(6, 3, dtype=torch.int64)),
        "unknown session": _train_frame("nobody/x", 0, 1),
        "out of order step": _train_frame(session, 5, 1),
        "unknown kind": Frame(kind="exec", header={"session": session}),
    }


@pytest.mark.parametrize("case", list(_garbage_frames("s")))
def test_malformed_frames_are_refused_and_change_nothing(server_and_session, case):
    server, session = server_and_session
    before = _snapshot(server, session)
    reply = _call(server, _garbage_frames(session)[case])
    assert reply.kind == P.ERROR and reply.header["message"]
    _assert_unchanged(before, _snapshot(server, session))
    # ... and the server goes on serving
    assert _call(server, _train_frame(session, 0, seed=0)).kind == P.OK


def test_oversized_frame_is_refused():
    server = SideServer(ServerConfig(device="cpu", max_frame_mb=1))
    session = _call(server, _hello()).header["session"]
    big = _train_frame(session, 0, 1, codec="fp32", **P.pack_acts(torch.randn(6 * 3000, 3, 16), torch.full((6,), 3000), "fp32"))
    reply = _call(server, big)
    assert reply.kind == P.ERROR and "bytes" in reply.header["message"]


def test_hello_refuses_unregistered_module():
    server = SideServer(ServerConfig(device="cpu"))
    hello = _hello()
    hello.header["module"] = "os:system"
    reply = _call(server, hello)
    assert reply.kind == P.ERROR and "unknown module" in reply.header["message"]
    assert not server.sessions


def test_state_round_trip_and_bad_state_leaves_session_unchanged(server_and_session):
    server, session = server_and_session
    for step in range(3):
        _call(server, _train_frame(session, step, seed=step))
    reply = _call(server, Frame(kind=P.GET_STATE, header={"session": session}))
    state = P.unpack_state(reply.header["skeleton"], reply.tensors["state"])
    assert state["step"] == 3 and state["optimizer"]["state"]

    # a fresh session restored from that state continues where the first left off
    other = SideServer(ServerConfig(device="cpu"))
    s2 = _call(other, _hello()).header["session"]
    skeleton, blob = P.pack_state(state)
    assert _call(other, Frame(kind=P.SET_STATE, header={"session": s2, "skeleton": skeleton}, tensors={"state": blob})).kind == P.OK
    r1 = _call(server, _train_frame(session, 3, seed=3)).header
    r2 = _call(other, _train_frame(s2, 3, seed=3)).header
    assert r1["loss"] == pytest.approx(r2["loss"]) and r1["lr"] == pytest.approx(r2["lr"])

    before = _snapshot(server, session)
    bad = dict(state)
    bad["model"] = {k: torch.zeros(2, 2) for k in state["model"]}
    skeleton, blob = P.pack_state(bad)
    reply = _call(server, Frame(kind=P.SET_STATE, header={"session": session, "skeleton": skeleton}, tensors={"state": blob}))
    assert reply.kind == P.ERROR
    _assert_unchanged(before, _snapshot(server, session))


def test_link_refuses_wrong_token_before_decoding():
    seen: list[int] = []

    def handler(data: bytes) -> bytes:
        seen.append(len(data))
        return b"reply:" + data

    server, port = serve_link(handler, host="127.0.0.1", port=0, token="s3cret")
    try:
        good = GrpcLink(f"127.0.0.1:{port}", "s3cret", connect_timeout=10)
        assert good.call(b"abc") == b"reply:abc"
        assert good.stats.snapshot() == {"bytes_up": 3, "bytes_down": 9, "calls": 1}
        bad = GrpcLink(f"127.0.0.1:{port}", "wrong", connect_timeout=10)
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            bad.call(b"xyz")
        assert seen == [3]  # the refused call never reached the handler
        assert good.submit(b"later").result() == b"reply:later"  # still serving
        good.close()
        bad.close()
    finally:
        server.stop(0)


def test_unreachable_server_names_the_address():
    with pytest.raises(LinkError, match="127.0.0.1:9"):
        GrpcLink("127.0.0.1:9", connect_timeout=1.0)


def _pae_session(server: SideServer) -> str:
    from lightning_mobillm.modules import AdditiveAdapterModule

    module = AdditiveAdapterModule(backbone=BackboneConfig(source="unused"), num_classes=NUM_CLASSES, seed=0)
    hello = _hello()
    hello.header.update(module="additive_adapter", hparams=P.json_safe(module.hparams_dict()), num_outputs=16,
                        num_classes=NUM_CLASSES)
    reply = _call(server, hello)
    assert reply.kind == P.OK, reply.header
    return reply.header["session"]


def _target_frame(session: str, step: int, **extra) -> Frame:
    acts, lengths, _ = _batch(step, tokens=1)
    tensors = {**P.pack_acts(acts, lengths, "int8"), "targets": torch.randn(6, 16), **extra}
    return Frame(kind=P.TRAIN_TARGET, header={"session": session, "step": step, "codec": "int8"}, tensors=tensors)


def test_label_free_session_refuses_labels():
    server = SideServer(ServerConfig(device="cpu"))
    session = _pae_session(server)
    before = _snapshot(server, session)
    # a labelled frame kind, and a target frame smuggling a labels tensor, are both refused
    reply = _call(server, _train_frame(session, 0, seed=0))
    assert reply.kind == P.ERROR and "label-free" in reply.header["message"]
    reply = _call(server, _target_frame(session, 0, labels=torch.zeros(6, dtype=torch.int64)))
    assert reply.kind == P.ERROR and "labels" in reply.header["message"]
    _assert_unchanged(before, _snapshot(server, session))
    reply = _call(server, _target_frame(session, 0))
    assert reply.kind == P.OK and "acc" not in reply.header  # the server cannot score what it cannot see
