"""Fed MobiLLM over our link: the ``fed`` role's server (:class:`FedServer`) and the device's :class:`FedClient`.

Many virtual devices of two backbone types talk to one server over the in-process link, each with an identity
of its own (as a tokens file names them): acknowledgements only during training, training on arrival in arrival
order and replay in between, quotas, schemas with no place for labels, token ids or text, devices kept apart,
hellos that do not fit the federation refused, retries never cached twice, refusals that change nothing, a
restart that continues with every acknowledged upload, and a federation that learns. One test runs the role
over real gRPC. The training loop runs synchronously (``background=False`` + ``step_pending``): no sleeping.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import threading

import pytest
import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.client import ServerError
from lightning_mobillm.fed.client import FedClient
from lightning_mobillm.fed.upload import Upload
from lightning_mobillm.privacy import make_transform, prediction_difference
from lightning_mobillm.server.app import ROLES, make_handler
from lightning_mobillm.server.dispatch import NO_SESSION
from lightning_mobillm.server.fed import FedServer
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame
from lightning_mobillm.transport.link import InProcessLink, LinkError, serve_link
from lightning_mobillm.transport.security import Credentials, hash_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (see conftest)

A, B = "tiny-a/llama/d12-L4", "tiny-b/qwen2/d16-L6"
WIDTH = {A: 12, B: 16}
K, CLASSES, EMBED = 2, 3, 6
#: six virtual devices: identity -> backbone type
DEVICES = {"alice": A, "bob": B, "carol": A, "dave": B, "erin": A, "frank": B}


# ---------------------------------------------------------------------------------------------- helpers
def _transform(device: str):
    """The device's own secret transform (the ``device`` target space)."""
    return make_transform("embed", CLASSES, key=f"key-{device}", out_dim=EMBED)


def _samples(backbone_type: str, n: int, seed: int):
    """A separable task: taps around a fixed per-type mean of each class; the backbone's prior is weak noise."""
    type_seed = int.from_bytes(hashlib.sha256(backbone_type.encode()).digest()[:4], "little")
    means = torch.randn(CLASSES, K, WIDTH[backbone_type], generator=torch.Generator().manual_seed(type_seed)) * 1.5
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return means[labels] + torch.randn(n, K, WIDTH[backbone_type], generator=g), labels, torch.randn(n, CLASSES,
                                                                                                      generator=g) * 0.5


def make_upload(device: str, n: int = 12, seed: int = 0, *, codec: str = "int8") -> Upload:
    """An upload as a device worker makes it: taps in a codec's parts, ``T_d(onehot(y) - softmax(z_b))``."""
    backbone_type = DEVICES[device]
    acts, labels, logits = _samples(backbone_type, n, seed + 1000 * list(DEVICES).index(device))
    parts = P.pack_acts(acts, torch.ones(n, dtype=torch.int64), codec)
    return Upload(device=device, backbone_type=backbone_type, keys=[f"{device}-{seed}-{i}" for i in range(n)],
                  acts={k: v for k, v in parts.items() if k != "lengths"}, codec=codec,
                  targets=_transform(device).forward(prediction_difference(labels, logits)))


def _config(tmp_path, **settings) -> ServerConfig:
    return ServerConfig(**{"device": "cpu", "workdir": str(tmp_path), "fed_batch_size": 8, "fed_lr": 1e-2, **settings})


def _server(tmp_path, **settings) -> FedServer:
    return FedServer(_config(tmp_path, **settings), background=False)


def _client(server: FedServer, identity: str, **kwargs) -> FedClient:
    backbone_type = kwargs.pop("backbone_type", DEVICES.get(identity, A))
    settings = {"device_id": identity, "run_id": "r1", "backbone_type": backbone_type, "k": K,
                "width": WIDTH.get(backbone_type, 12), "out_dim": EMBED, **kwargs}
    return FedClient(InProcessLink(server.handle, identity=identity), **settings)


def _ask(server: FedServer, frame: Frame, identity: str) -> Frame:
    return decode_frame(server.handle(encode_frame(frame), identity), P.FED_REPLY_SCHEMAS, require_finite=False)


def _upload_frame(client: FedClient, upload: Upload, seq: int, **header) -> Frame:
    return Frame(kind=P.FED_UPLOAD, header={"session": client.session, "secret": client.secret, "seq": seq,
                                            "codec": upload.codec, "keys": list(upload.keys), **header},
                 tensors={**upload.acts, "targets": upload.targets})


def _snapshot(server: FedServer):
    """Everything a refused frame must leave as it was."""
    trainer = server.trainer
    return (trainer.statistics(), trainer.num_samples, list(trainer.module.components), trainer.engine.step,
            {k: v.clone() for k, v in trainer.module.state_dict().items()}, server.queued_samples,
            {k: (s.seq, s.last_reply) for k, s in server.sessions.items()}, dict(server._ledger), server._accepted)


def _same(a, b) -> bool:
    return a[:4] == b[:4] and a[5:] == b[5:] and a[4].keys() == b[4].keys() and all(
        torch.equal(a[4][k], b[4][k]) for k in a[4])


def _accuracy(client: FedClient, device: str, seed: int) -> tuple[float, float]:
    """The device's own evaluation with its downloaded parts on held-out samples: composed, and zero-shot."""
    acts, labels, logits = _samples(DEVICES[device], 60, seed)
    scores = client.download().scores(acts, logits, _transform(device))
    return float((scores.argmax(-1) == labels).float().mean()), float((logits.argmax(-1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------- the protocol
def test_the_fed_schemas_have_no_place_for_labels_token_ids_or_text():
    forbidden = {"labels", "label", "input_ids", "token_ids", "text", "texts", "attention_mask", "lengths"}
    for kind, schema in P.FED_REQUEST_SCHEMAS.items():
        names = set(schema.tensors) | set(schema.required_header) | set(schema.optional_header)
        assert not names & forbidden, kind
        assert not schema.allow_header_extra, kind
    upload = P.FED_REQUEST_SCHEMAS[P.FED_UPLOAD]
    assert set(upload.tensors) == {"acts.q", "acts.scale", "acts.d", "acts.oidx", "acts.oval", "targets"}
    assert set(upload.required_header) == {"session", "secret", "seq", "codec", "keys"}
    assert "fed" in ROLES and P.FED_HELLO not in P.REQUEST_SCHEMAS  # a role of its own, the others unchanged
    assert P.PROTOCOL_VERSION == 3


@pytest.mark.parametrize("case", ["labels tensor", "token ids tensor", "label header", "text header",
                                  "lengths tensor", "text in the hello"])
def test_labels_token_ids_and_text_are_refused_and_change_nothing(tmp_path, case):
    server = _server(tmp_path)
    alice = _client(server, "alice")
    alice.hello()
    alice.upload(make_upload("alice", 6))
    before = _snapshot(server)
    up = make_upload("alice", 4, seed=1)
    frame = _upload_frame(alice, up, 1)
    if case == "labels tensor":
        frame.tensors["labels"] = torch.zeros(4, dtype=torch.int64)
    elif case == "token ids tensor":
        frame.tensors["input_ids"] = torch.zeros(4, 8, dtype=torch.int64)
    elif case == "label header":
        frame.header["labels"] = [0, 1, 2, 0]
    elif case == "text header":
        frame.header["text"] = "a secret article"
    elif case == "lengths tensor":
        frame.tensors["lengths"] = torch.ones(4, dtype=torch.int64)
    else:
        frame = Frame(kind=P.FED_HELLO, header={"protocol": 3, "device_id": "alice", "run_id": "r2",
                                                "backbone_type": A, "k": K, "width": 12, "out_dim": EMBED,
                                                "target_space": "device", "codec": "int8", "text": "hi"})
    reply = _ask(server, frame, "alice")
    message = reply.header["message"]
    assert reply.kind == P.ERROR and ("are not allowed" in message or "are not in the schema" in message), message
    assert _same(before, _snapshot(server)) and set(server.sessions) == {"alice/r1"}


# ---------------------------------------------------------------------------------------------- training
def test_six_devices_get_acknowledgements_only_and_the_server_trains_in_arrival_order_then_replays(tmp_path):
    server = _server(tmp_path, fed_max_replay_steps=5, checkpoint_every_n_steps=0)
    sizes = {"alice": 12, "bob": 9, "carol": 16, "dave": 5, "erin": 8, "frank": 7}
    for device, n in sizes.items():
        client = _client(server, device)
        federation = client.hello()
        assert (federation["k"], federation["out_dim"], federation["target_space"]) == (K, EMBED, "device")
        assert federation["d_star"] == 12  # the first device's width: no allow-list, no fed_d_star
        (ack,) = client.upload(make_upload(device, n))
        # an acknowledgement: nothing about training (no loss, no step), the device's own counts
        assert set(ack) == {"seq", "accepted", "samples", "quota_left"} and ack["accepted"] == n
    assert server.trainer.engine.step == 0 and server.queued_samples == sum(sizes.values())
    # arrival steps: batch_size 8 samples of the oldest arrival at a time, in arrival order
    order = []
    for device, n in sizes.items():
        for _ in range(math.ceil(n / 8)):
            assert server.step_pending() == "arrival"
            order.append(device)
        devices = server.trainer.statistics()["devices"]
        assert devices[device]["sample_steps"] == n
        later = list(sizes)[list(sizes).index(device) + 1:]
        assert all(devices[d]["steps"] == 0 for d in later)  # nobody after it trained yet
    assert server.queued_samples == 0
    # then replay in between, up to the bound, then nothing until the next arrival
    assert server.run_pending() == ["replay"] * 5 and server.step_pending() is None
    totals = server.trainer.statistics()["totals"]
    assert (totals["arrival_steps"], totals["replay_steps"]) == (len(order), 5)
    late = _client(server, "alice", run_id="r2")
    late.hello()
    late.upload(make_upload("alice", 3, seed=9))
    assert server.run_pending(max_steps=2) == ["arrival", "replay"]  # an arrival goes first, the budget renews
    assert server.run_pending() == ["replay"] * 4


def test_an_upload_is_trained_on_before_the_replays_that_would_follow(tmp_path):
    server = _server(tmp_path, fed_max_replay_steps=50, checkpoint_every_n_steps=0)
    alice, bob = _client(server, "alice"), _client(server, "bob")
    alice.hello()
    bob.hello()
    alice.upload(make_upload("alice", 16))
    assert server.run_pending(max_steps=4) == ["arrival", "arrival", "replay", "replay"]
    bob.upload(make_upload("bob", 8))
    assert server.step_pending() == "arrival"  # in between replays, as soon as it is there
    assert server.trainer.statistics()["devices"]["bob"]["sample_steps"] == 8
    assert server.step_pending() == "replay"


def test_without_replay_the_server_trains_arrivals_only(tmp_path):
    server = _server(tmp_path, fed_replay=False, checkpoint_every_n_steps=0)
    alice = _client(server, "alice")
    alice.hello()
    alice.upload(make_upload("alice", 10))
    assert server.run_pending() == ["arrival", "arrival"]


def test_the_federation_learns_and_every_device_classifies_with_what_it_downloads(tmp_path):
    server = _server(tmp_path, fed_batch_size=16, fed_max_replay_steps=140, checkpoint_every_n_steps=0,
                     allowed_backbones=[A, B])
    clients = {device: _client(server, device) for device in DEVICES}
    for i, (device, client) in enumerate(clients.items()):
        assert client.hello()["d_star"] == 12  # the lower median of the allow-list's widths
        client.upload(make_upload(device, 48, seed=i))
        server.run_pending(max_steps=3)  # arrivals interleave with training
    kinds = server.run_pending()
    assert kinds.count("replay") == 140 and server.step_pending() is None
    for device, client in clients.items():
        accuracy, zero_shot = _accuracy(client, device, seed=500)
        assert accuracy >= 0.8 and accuracy > zero_shot + 0.2, (device, accuracy, zero_shot)
        stats = client.stats()
        assert stats["device"]["samples"] == 48 and stats["device"]["steps"] > 0
        assert stats["totals"]["devices"] == 6 and stats["totals"]["samples"] == 6 * 48
        client.close()
    assert not server.sessions


# ---------------------------------------------------------------------------------------------- quotas and retries
def test_a_device_over_its_quota_is_refused_and_the_refusal_frees_its_seq(tmp_path):
    server = _server(tmp_path, fed_max_samples_per_device=30, checkpoint_every_n_steps=0)
    alice = _client(server, "alice")
    assert alice.hello()["quota_left"] == 30
    assert alice.upload(make_upload("alice", 24))[0]["quota_left"] == 6
    before = _snapshot(server)
    with pytest.raises(ServerError, match="exceed its quota of 30"):
        alice.upload(make_upload("alice", 10, seed=1))
    assert _same(before, _snapshot(server)) and alice.unacknowledged == 0
    (ack,) = alice.upload(make_upload("alice", 6, seed=2))
    assert ack["seq"] == 1 and ack["quota_left"] == 0  # the refused upload's seq was free again
    assert alice.stats()["quota_left"] == 0
    bob = _client(server, "bob")  # a quota is per device
    assert bob.hello()["quota_left"] == 30


def test_a_retried_upload_gets_the_stored_acknowledgement_and_is_not_cached_twice(tmp_path):
    server = _server(tmp_path, checkpoint_every_n_steps=0)
    alice = _client(server, "alice")
    alice.hello()
    up = make_upload("alice", 8)
    first = server.handle(encode_frame(_upload_frame(alice, up, 0)), "alice")
    again = server.handle(encode_frame(_upload_frame(alice, up, 0)), "alice")
    assert again == first and server.trainer.num_samples == 8 and server.queued_samples == 8
    alice.hello()  # a reconnect: a new secret, the same frame is still the same upload
    assert server.handle(encode_frame(_upload_frame(alice, up, 0)), "alice") == first
    assert server.trainer.statistics()["devices"]["alice"]["uploads"] == 1
    # another frame for an acknowledged seq, or a seq out of order, is refused
    other = make_upload("alice", 8, seed=1)
    for frame, match in ((_upload_frame(alice, other, 0), "acknowledged for another frame"),
                         (_upload_frame(alice, other, 2), "out-of-order")):
        reply = _ask(server, frame, "alice")
        assert reply.kind == P.ERROR and match in reply.header["message"]
    assert server.trainer.num_samples == 8


class _LosesReplies(InProcessLink):
    """Delivers every frame but loses the reply of the first ``lose`` calls (the server applied them)."""

    def __init__(self, handler, identity: str, lose: int) -> None:
        super().__init__(handler, identity=identity)
        self.lose = lose

    def _exchange_bytes(self, request: bytes) -> bytes:
        reply = super()._exchange_bytes(request)
        if self.lose > 0:
            self.lose -= 1
            raise LinkError("the reply was lost", code="DEADLINE_EXCEEDED")
        return reply


def test_the_client_sends_a_frame_again_after_a_lost_reply_and_the_server_keeps_it_once(tmp_path):
    server = _server(tmp_path, checkpoint_every_n_steps=0)
    alice = FedClient(_LosesReplies(server.handle, "alice", lose=0), device_id="alice", run_id="r1",
                      backbone_type=A, k=K, width=12, out_dim=EMBED, max_samples_per_frame=5)
    alice.hello()
    alice.link.lose = 1
    acks = alice.upload(make_upload("alice", 12))  # three frames of 5 + 5 + 2; the first reply is lost once
    assert [a["seq"] for a in acks] == [0, 1, 2] and [a["accepted"] for a in acks] == [5, 5, 2]
    assert server.trainer.num_samples == 12 and server.trainer.statistics()["devices"]["alice"]["uploads"] == 3
    # a link that fails for good: the frame stays queued; on a new link the client resumes and sends it
    alice.link.lose, alice.retries = 5, 0
    with pytest.raises(LinkError):
        alice.upload(make_upload("alice", 4, seed=1))
    assert alice.unacknowledged == 4 and server.trainer.num_samples == 16  # applied, reply lost
    alice.reconnect(InProcessLink(server.handle, identity="alice"))
    assert alice.flush() == [{"seq": 3, "accepted": 4, "samples": 16, "quota_left": 4096 - 16}]
    assert server.trainer.num_samples == 16 and alice.unacknowledged == 0


# ---------------------------------------------------------------------------------------------- devices kept apart
def test_a_device_downloads_only_its_own_head_and_reads_only_its_own_statistics(tmp_path):
    server = _server(tmp_path, checkpoint_every_n_steps=0)
    alice, bob, carol = (_client(server, d) for d in ("alice", "bob", "carol"))
    for client in (alice, bob, carol):
        client.hello()
    alice.upload(make_upload("alice", 8))
    bob.upload(make_upload("bob", 8))
    server.run_pending(max_steps=6)
    module = server.trainer.module
    for client, device in ((alice, "alice"), (bob, "bob")):
        parts = client.download_parts()
        assert parts.config["device"] == device and parts.config["backbone_type"] == DEVICES[device]
        assert torch.equal(parts.state["head.proj.weight"], module.heads[device].proj.weight.half())  # float16
        other = "bob" if device == "alice" else "alice"
        assert not torch.equal(parts.state["head.proj.weight"], module.heads[other].proj.weight.half())
        stats = client.stats()
        assert stats["device"]["samples"] == 8
        assert other not in json.dumps(stats)  # nothing of another device
    with pytest.raises(ServerError, match="has not uploaded anything"):
        carol.download()
    # another identity cannot use a session, even with its name and secret
    for kind in (P.FED_DOWNLOAD, P.FED_STATS, P.BYE):
        reply = _ask(server, Frame(kind=kind, header={"session": alice.session, "secret": alice.secret}), "bob")
        assert reply.kind == P.ERROR and reply.header["message"] == NO_SESSION
    stolen = _upload_frame(alice, make_upload("alice", 4, seed=3), 1)
    assert _ask(server, stolen, "bob").header["message"] == NO_SESSION
    # a device id claimed in the hello names nobody when the transport names the identity
    mallory = _client(server, "mallory", device_id="alice", backbone_type=A)
    assert mallory.hello()["samples"] == 0 and mallory.session == "mallory/r1"
    with pytest.raises(ServerError, match="has not uploaded anything"):
        mallory.download()


def test_without_an_identity_the_hello_device_id_owns_the_session(tmp_path):
    server = _server(tmp_path, checkpoint_every_n_steps=0)
    phone = FedClient(InProcessLink(server.handle), device_id="phone-7", run_id="r1", backbone_type=A, k=K,
                      width=12, out_dim=EMBED)
    phone.hello()
    phone.upload(make_upload("alice", 4))
    assert phone.session == "device:phone-7/r1"
    assert set(server.trainer.statistics()["devices"]) == {"device:phone-7"}
    assert phone.download_parts().config["device"] == "device:phone-7"


# ---------------------------------------------------------------------------------------------- hellos refused
HELLO_REFUSALS = {
    "another K": ({"k": 3}, "this federation has k = 2"),
    "another target width": ({"out_dim": 5}, "this federation has out_dim = 6"),
    "another target space": ({"target_space": "plain"}, "this federation has target_space = 'device'"),
    "a width that is not the type's": ({"width": 14}, "is not the width of backbone type"),
    "too shallow for K": ({"backbone_type": "tiny-z/llama/d12-L1"}, "fewer than the federation's K"),
    "not a type key": ({"backbone_type": "smollm2"}, "looks like"),
    "unknown codec": ({"codec": "zip"}, "codec must be one of"),
    "unknown target space": ({"target_space": "nobody"}, "target_space must be one of"),
    "too many taps": ({"k": 129}, "max_taps"),
    "another protocol": ({"protocol": 2}, "protocol version 2"),
    "another type than its uploads": ({"backbone_type": B, "width": 16, "run_id": "r2"}, "keeps its type"),
}


@pytest.mark.parametrize("case", sorted(HELLO_REFUSALS))
def test_a_hello_that_does_not_fit_the_federation_is_refused_and_changes_nothing(tmp_path, case):
    server = _server(tmp_path, checkpoint_every_n_steps=0)
    alice = _client(server, "alice")
    alice.hello()
    alice.upload(make_upload("alice", 4))
    before = _snapshot(server)
    changes, match = HELLO_REFUSALS[case]
    header = {"protocol": 3, "device_id": "alice", "run_id": "r9", "backbone_type": A, "k": K, "width": 12,
              "out_dim": EMBED, "target_space": "device", "codec": "int8", **changes}
    reply = _ask(server, Frame(kind=P.FED_HELLO, header=header), "alice")
    assert reply.kind == P.ERROR and match in reply.header["message"], reply.header
    assert _same(before, _snapshot(server)) and set(server.sessions) == {"alice/r1"}


def test_the_configured_federation_refuses_a_first_hello_that_disagrees_and_builds_nothing(tmp_path):
    server = _server(tmp_path, fed_k=2, fed_out_dim=EMBED, fed_target_space="device", fed_d_star=10)
    with pytest.raises(ServerError, match="this federation has k = 2"):
        _client(server, "alice", k=3).hello()
    assert server.trainer is None and not server.sessions
    assert not (tmp_path / "fed").exists()
    assert _client(server, "alice").hello()["d_star"] == 10


def test_a_backbone_type_outside_the_allow_list_is_refused(tmp_path):
    server = _server(tmp_path, allowed_backbones=[A], checkpoint_every_n_steps=0)
    with pytest.raises(ServerError, match="not in this server's allow-list"):
        _client(server, "bob").hello()
    assert server.trainer is None and not server.sessions
    _client(server, "alice").hello()
    assert server.trainer.module.shared_width == 12


def test_a_full_federation_refuses_a_new_device_but_not_a_member(tmp_path):
    """``fed_max_devices``: with a shared token any caller may name a new device id; the cap bounds how many
    the federation (and its upload cache) holds. A member reconnecting is not a new device."""
    server = _server(tmp_path, fed_max_devices=2, checkpoint_every_n_steps=0)
    alice, bob = _client(server, "alice"), _client(server, "bob")
    alice.hello()
    bob.hello()
    with pytest.raises(ServerError, match="federation is full.*fed_max_devices"):
        _client(server, "carol").hello()
    assert "device:carol/r1" not in server.sessions and "carol/r1" not in server.sessions
    _client(server, "alice").hello()  # a member's reconnect


def test_an_identity_that_cannot_name_a_device_is_refused(tmp_path):
    server = _server(tmp_path, checkpoint_every_n_steps=0)
    with pytest.raises(ServerError, match="cannot name a device"):
        _client(server, "_alice", backbone_type=A).hello()


# ---------------------------------------------------------------------------------------------- refusals change nothing
def _nan_targets(upload: Upload) -> Upload:
    upload.targets[1, 2] = math.nan
    return upload


UPLOAD_REFUSALS = {
    "wrong width": (lambda c: _upload_frame(c, make_upload("bob", 4, seed=5), 1), "no larger than \\[4, 2, 12\\]"),
    "keys and rows disagree": (lambda c: _upload_frame(c, make_upload("alice", 4, seed=5), 1,
                                                       keys=["a", "b", "c"]), "4 samples of activations for 3"),
    "non-finite targets": (lambda c: _upload_frame(c, _nan_targets(make_upload("alice", 4, seed=5)), 1), "NaN"),
    "another codec": (lambda c: _upload_frame(c, make_upload("alice", 4, seed=5, codec="fp16"), 1),
                      "declared codec 'int8'"),
    "a sample uploaded before": (lambda c: _upload_frame(c, make_upload("alice", 6), 1), "uploaded before"),
    "over quota": (lambda c: _upload_frame(c, make_upload("alice", 20, seed=5), 1), "quota"),
    "targets of another width": (lambda c: Frame(kind=P.FED_UPLOAD, header=_upload_frame(
        c, make_upload("alice", 4, seed=5), 1).header, tensors={**make_upload("alice", 4, seed=5).acts,
                                                                 "targets": torch.zeros(4, 5)}), "targets must be"),
    "malformed key": (lambda c: _upload_frame(c, make_upload("alice", 1, seed=5), 1, keys=["../x"]),
                      "is not of the form"),
    "a stale seq": (lambda c: _upload_frame(c, make_upload("alice", 4, seed=5), 0), "acknowledged for another"),
    "a wrong secret": (lambda c: Frame(kind=P.FED_UPLOAD, header={**_upload_frame(
        c, make_upload("alice", 4, seed=5), 1).header, "secret": "0" * 32},
        tensors=_upload_frame(c, make_upload("alice", 4, seed=5), 1).tensors), re.escape(NO_SESSION)),
}


@pytest.mark.parametrize("case", sorted(UPLOAD_REFUSALS))
def test_refused_uploads_change_nothing(tmp_path, case):
    server = _server(tmp_path, fed_max_samples_per_device=20)
    alice = _client(server, "alice")
    alice.hello()
    alice.upload(make_upload("alice", 6))
    server.run_pending(max_steps=3)
    before = _snapshot(server)
    logged = sorted(p.name for p in server.upload_dir.iterdir())
    make, match = UPLOAD_REFUSALS[case]
    reply = _ask(server, make(alice), "alice")
    assert reply.kind == P.ERROR
    assert re.search(match, reply.header["message"]), reply.header["message"]
    assert _same(before, _snapshot(server))
    assert sorted(p.name for p in server.upload_dir.iterdir()) == logged


# ---------------------------------------------------------------------------------------------- restarts
def test_a_restarted_server_continues_with_every_acknowledged_upload(tmp_path):
    settings = {"checkpoint_every_n_steps": 3, "fed_max_replay_steps": 4}
    server = _server(tmp_path, **settings)
    clients = {d: _client(server, d) for d in ("alice", "bob", "carol")}
    for client in clients.values():
        client.hello()
    clients["alice"].upload(make_upload("alice", 12))
    clients["bob"].upload(make_upload("bob", 9))
    assert server.run_pending() == ["arrival"] * 4 + ["replay"] * 4  # checkpoints at steps 3 and 6
    assert not any(server.upload_dir.iterdir())  # the checkpoint holds both uploads: the log is empty
    # acknowledged after the last checkpoint, never trained: only in the upload log
    last = _upload_frame(clients["carol"], make_upload("carol", 7), 0)
    ack = server.handle(encode_frame(last), "carol")
    (bob_ack,) = clients["bob"].upload(make_upload("bob", 5, seed=1))
    assert len(list(server.upload_dir.iterdir())) == 2
    stats, step = server.trainer.statistics(), server.trainer.engine.step
    saved = torch.load(server.checkpoint_path, weights_only=True)  # no pickle in the server's own checkpoint
    assert saved["trainer"]["engine"]["step"] == 6 and saved["included"] == 2
    del server  # killed: no close(), no final checkpoint

    restarted = _server(tmp_path, **settings)
    trainer = restarted.trainer
    assert {d: s["samples"] for d, s in trainer.statistics()["devices"].items()} == {
        d: s["samples"] for d, s in stats["devices"].items()} == {"alice": 12, "bob": 14, "carol": 7}
    assert trainer.engine.step == 6 and step == 8  # the steps after the checkpoint are redone, not lost twice
    assert restarted.queued_samples == 12  # the logged uploads wait for their arrival steps again
    # devices resume their sessions: the next seq, and a retry of the last frame gets the stored reply
    carol = _client(restarted, "carol")
    assert carol.hello(resume=True)["seq"] == 1
    assert restarted.handle(encode_frame(_upload_frame(carol, make_upload("carol", 7), 0)), "carol") == ack
    bob = _client(restarted, "bob")
    assert bob.hello(resume=True)["samples"] == 14 and bob.seq == 2
    with pytest.raises(ServerError, match="uploaded before"):
        bob.upload(make_upload("bob", 5, seed=1))  # the samples are there: never cached twice
    assert bob_ack["seq"] == 1 and bob.upload(make_upload("bob", 3, seed=2))[0]["seq"] == 2
    assert restarted.run_pending()[:3] == ["arrival"] * 3
    with pytest.raises(ServerError, match="no fed session"):
        _client(restarted, "dave").hello(resume=True)


def test_close_stops_the_training_thread_and_writes_a_checkpoint_a_restart_loads(tmp_path):
    server = FedServer(_config(tmp_path, fed_max_replay_steps=3), background=True)
    assert server._thread is not None and server._thread.is_alive()
    alice = _client(server, "alice")
    alice.hello()
    alice.upload(make_upload("alice", 10))
    thread = server._thread
    server.close()
    server.close()  # idempotent
    assert not thread.is_alive() and server._thread is None
    restarted = _server(tmp_path)
    assert restarted.trainer.num_samples == 10
    # the thread stopped after a whole step: each of the upload's samples was trained on arrival or still waits
    arrival_steps = restarted.trainer.statistics()["totals"]["arrival_steps"]
    assert restarted.queued_samples == 10 - min(10, 8 * arrival_steps)
    assert not any(restarted.upload_dir.iterdir())


class _Observed(FedServer):
    """A server whose training thread says when it has nothing left to do (no sleeping to wait for it)."""

    def __init__(self, *args, **kwargs) -> None:
        self.idle = threading.Event()
        super().__init__(*args, **kwargs)

    def step_pending(self) -> str | None:
        kind = super().step_pending()
        if kind is None:
            self.idle.set()
        return kind


def test_the_background_thread_trains_on_arrival_then_replays_then_waits(tmp_path):
    server = _Observed(_config(tmp_path, fed_max_replay_steps=3, checkpoint_every_n_steps=0))
    try:
        assert server.idle.wait(60)  # a failsafe bound only: set as soon as the thread finds nothing to do
        server.idle.clear()
        alice = _client(server, "alice")
        alice.hello()
        alice.upload(make_upload("alice", 10))  # wakes the thread, which runs until there is nothing to do
        assert server.idle.wait(60)
        totals = alice.stats()["totals"]
        assert (totals["arrival_steps"], totals["replay_steps"]) == (2, 3) and server.queued_samples == 0
    finally:
        server.close()
    assert server._thread is None


def test_a_restart_refuses_a_config_that_disagrees_with_its_federation(tmp_path):
    server = _server(tmp_path)
    _client(server, "alice").hello()
    server.close()
    with pytest.raises(ValueError, match="has K = 2, this server's config says 3"):
        _server(tmp_path, fed_k=3)


def test_the_app_serves_the_fed_role(tmp_path):
    handler = make_handler("fed", _config(tmp_path))
    try:
        assert isinstance(handler, FedServer) and handler._thread is not None
    finally:
        handler.close()


# ---------------------------------------------------------------------------------------------- over gRPC
def test_two_devices_of_different_backbones_over_grpc(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {hash_token('alice-token')}\nbob {hash_token('bob-token')}\n")
    server = _server(tmp_path, fed_batch_size=16, fed_max_replay_steps=60)
    grpc_server, port = serve_link(server.handle, host="127.0.0.1", port=0,
                                   credentials=Credentials.from_tokens_file(tokens))
    try:
        clients = {d: FedClient.connect(f"127.0.0.1:{port}", f"{d}-token", device_id=d, run_id="live",
                                        backbone_type=DEVICES[d], k=K, width=WIDTH[DEVICES[d]], out_dim=EMBED,
                                        connect_timeout=30, call_timeout=60)
                   for d in ("alice", "bob")}
        for i, (device, client) in enumerate(clients.items()):
            assert client.hello()["k"] == K and client.session == f"{device}/live"
            assert client.upload(make_upload(device, 48, seed=i))[0]["accepted"] == 48
        server.run_pending()
        for device, client in clients.items():
            accuracy, zero_shot = _accuracy(client, device, seed=700)
            assert accuracy > zero_shot + 0.2, (device, accuracy, zero_shot)
            assert client.stats()["device"]["backbone_type"] == DEVICES[device]
            assert client.traffic["bytes_up"] > 48 * K * WIDTH[DEVICES[device]]  # int8 taps went up
        for client in clients.values():
            client.close()
        assert not server.sessions
    finally:
        grpc_server.stop(0).wait()
        server.close()


# ---------------------------------------------------------------------------------------------- layering
def test_the_device_client_loads_neither_lightning_nor_the_server():
    code = ("import sys, lightning_mobillm.fed.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' "
            "or m == 'lightning_mobillm.server' or m.startswith('lightning_mobillm.server.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
