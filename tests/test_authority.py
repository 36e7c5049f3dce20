"""Authority on a server shared by mutually untrusted devices: identities own sessions, secrets authorise
frames, replays are stale, quotas and bounds hold, idle sessions expire without losing anything, and an
activation cache belongs to the identity that opened it.

Everything here goes through ``SideServer.handle(bytes, identity)``, the entry point both links call after
the transport has authenticated a call (the gRPC interceptor itself is tested in test_transport_security).
"""

from __future__ import annotations

import psutil
import pytest
import torch
from test_server import _assert_same_state, _batch, _hello, _set_state_frame, _train_frame

from lightning_mobillm import protocol as P
from lightning_mobillm.server.dispatch import NO_SESSION
from lightning_mobillm.server.runtime import SideServer
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ask(server: SideServer, frame: Frame, identity: str = "") -> Frame:
    return decode_frame(server.handle(encode_frame(frame), identity), P.REPLY_SCHEMAS, require_finite=False)


def _open(server: SideServer, identity: str = "", hello: Frame | None = None) -> dict:
    reply = _ask(server, hello or _hello(), identity)
    assert reply.kind == P.OK, reply.header
    return {"session": reply.header["session"], "secret": reply.header["secret"]}


def _state(server: SideServer, session: dict, identity: str = "alice") -> dict:
    reply = _ask(server, Frame(kind=P.GET_STATE, header=session), identity)
    assert reply.kind == P.OK, reply.header
    return P.unpack_state(reply.header["skeleton"], reply.tensors["state"])


def _server(tmp_path, **config) -> SideServer:
    return SideServer(ServerConfig(device="cpu", workdir=str(tmp_path), **config), clock=Clock())


def _cache_hello(**cache) -> Frame:
    from lightning_mobillm.modules import AdditiveAdapterModule
    from lightning_mobillm.specs import BackboneConfig

    module = AdditiveAdapterModule(backbone=BackboneConfig(source="unused"), num_classes=3, seed=0)
    hello = _hello()
    hello.header.update(module="additive_adapter", hparams=P.json_safe(module.hparams_dict()), num_outputs=16,
                        num_classes=3, cache=cache)
    return hello


def _target_frame(session: dict, step: int, keys: list[str]) -> Frame:
    acts, lengths, _ = _batch(step, batch=len(keys), tokens=1)
    tensors = {**P.pack_acts(acts, lengths, "int8"), "targets": torch.randn(len(keys), 16)}
    return Frame(kind=P.TRAIN_TARGET, header={**session, "step": step, "codec": "int8", "keys": keys}, tensors=tensors)


# ---- sessions belong to identities; frames need the secret ----------------------------------------------
def test_a_stolen_session_string_is_useless_without_its_secret_and_identity(tmp_path):
    server = _server(tmp_path)
    alice = _open(server, "alice")
    assert alice["session"] == "alice/r1"
    assert _ask(server, _train_frame(alice, 0, seed=0), "alice").kind == P.OK
    state = _ask(server, Frame(kind=P.GET_STATE, header=alice), "alice")
    # the session string alone, a guessed secret, or the right secret from another identity: all refused alike
    for header, identity in (({"session": alice["session"], "secret": "0" * 32}, "alice"),
                             (alice, "mallory"), (alice, "")):
        for frame in (Frame(kind=P.GET_STATE, header=header), _train_frame(header, 1, seed=1),
                      _set_state_frame(header, {"model": {}}), Frame(kind=P.BYE, header=header)):
            reply = _ask(server, frame, identity)
            assert reply.kind == P.ERROR and reply.header["message"] == NO_SESSION, (frame.kind, identity)
    after = _ask(server, Frame(kind=P.GET_STATE, header=alice), "alice")
    assert after.header["step"] == 1 and bytes(after.tensors["state"].numpy()) == bytes(state.tensors["state"].numpy())


def test_an_identity_cannot_open_or_reset_another_identitys_session(tmp_path):
    server = _server(tmp_path)
    alice = _open(server, "alice")
    _ask(server, _train_frame(alice, 0, seed=0), "alice")
    # mallory's hello claims alice's device id and run: it opens mallory's own session, alice's is untouched
    mallory = _open(server, "mallory")
    assert mallory["session"] == "mallory/r1"
    assert server.sessions["alice/r1"].step == 1 and server.sessions["mallory/r1"].step == 0


def test_a_hello_of_the_same_identity_reconnects_with_a_fresh_secret(tmp_path):
    server = _server(tmp_path)
    first = _open(server, "alice")
    for step in range(2):
        assert _ask(server, _train_frame(first, step, seed=step), "alice").kind == P.OK
    again = _ask(server, _hello(), "alice")
    assert again.header["session"] == first["session"] and again.header["step"] == 2  # state kept
    second = {"session": again.header["session"], "secret": again.header["secret"]}
    assert second["secret"] != first["secret"]
    stale = _ask(server, _train_frame(first, 2, seed=2), "alice")
    assert stale.kind == P.ERROR and stale.header["message"] == NO_SESSION  # the old secret is revoked
    assert _ask(server, _train_frame(second, 2, seed=2), "alice").header["step"] == 2


def test_a_reconnect_with_another_configuration_is_refused(tmp_path):
    server = _server(tmp_path)
    _open(server, "alice")
    other = _hello()
    other.header["num_outputs"] = 5
    reply = _ask(server, other, "alice")
    assert reply.kind == P.ERROR and "another module or taps" in reply.header["message"]


def test_with_a_shared_token_the_device_id_is_the_identity(tmp_path):
    server = _server(tmp_path)
    session = _open(server, "")
    assert session["session"] == "device:dev/r1"
    bad = _hello()
    bad.header["device_id"] = "../../etc"
    reply = _ask(server, bad, "")
    assert reply.kind == P.ERROR and "device_id" in reply.header["message"]


# ---- replays ------------------------------------------------------------------------------------------
def test_set_state_is_stale_once_training_resumed_and_a_retry_must_be_the_same_frame(tmp_path):
    server = _server(tmp_path)
    s = _open(server, "alice")
    first = _state(server, s)  # the state a replayed set_state would roll back to
    assert _ask(server, _set_state_frame(s, first), "alice").kind == P.OK  # right after the hello: a resume
    for step in range(2):
        assert _ask(server, _train_frame(s, step, seed=step), "alice").kind == P.OK
    trained = _state(server, s)
    replay = _ask(server, _set_state_frame(s, first), "alice")
    assert replay.kind == P.ERROR and "stale" in replay.header["message"]
    # a different frame for the applied step 1 is not a retry
    forged = _ask(server, _train_frame(s, 1, seed=99), "alice")
    assert forged.kind == P.ERROR and "already applied" in forged.header["message"]
    _assert_same_state(trained, _state(server, s))
    # the identity may always restore its own checkpoint: hello, then set_state
    s = _open(server, "alice")
    assert _ask(server, _set_state_frame(s, first), "alice").kind == P.OK
    assert _state(server, s)["step"] == 0


# ---- quotas, bounds and expiry ---------------------------------------------------------------------------
def test_sessions_per_identity_and_in_total_are_capped(tmp_path):
    server = _server(tmp_path, max_sessions_per_identity=2, max_sessions=3)
    for run in ("a", "b"):
        hello = _hello()
        hello.header["run_id"] = run
        _open(server, "alice", hello)
    hello.header["run_id"] = "c"
    reply = _ask(server, hello, "alice")
    assert reply.kind == P.ERROR and "max_sessions_per_identity" in reply.header["message"]
    _open(server, "bob", hello)
    hello.header["run_id"] = "d"
    reply = _ask(server, hello, "carol")
    assert reply.kind == P.ERROR and "too many open sessions" in reply.header["message"]


@pytest.mark.parametrize(("key", "value", "bound"), [
    ("tap_spec", {"layers": list(range(200)), "hidden_size": 16, "arch": "llama", "is_decoder": True}, "max_taps"),
    ("tap_spec", {"layers": [0], "hidden_size": 100_000, "arch": "llama", "is_decoder": True}, "max_width"),
    ("num_outputs", 50_000, "max_outputs"),
    ("tap_spec", {"layers": list(range(64)), "hidden_size": 4096, "arch": "llama", "is_decoder": True},
     "max_session_mb"),
])
def test_an_oversized_hello_is_refused_before_anything_is_allocated(tmp_path, key, value, bound):
    server = _server(tmp_path)
    hello = _hello()
    hello.header[key] = value
    rss = psutil.Process().memory_info().rss
    reply = _ask(server, hello, "alice")
    assert reply.kind == P.ERROR and bound in reply.header["message"]
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20  # the 64 x 4096 side network was ~1 GB
    assert not server.sessions


def test_a_frame_with_too_many_tokens_is_refused_before_it_is_dequantised(tmp_path):
    server = _server(tmp_path, max_tokens_per_frame=10)
    s = _open(server, "alice")
    reply = _ask(server, _train_frame(s, 0, seed=0), "alice")  # 6 samples x 3 tokens = 18 rows
    assert reply.kind == P.ERROR and "max_tokens_per_frame" in reply.header["message"]


def test_an_idle_session_is_checkpointed_closed_and_resumed(tmp_path):
    server = _server(tmp_path, session_idle_s=600, checkpoint_every_n_steps=0)
    s = _open(server, "alice")
    for step in range(3):
        _ask(server, _train_frame(s, step, seed=step), "alice")
    state = _state(server, s)
    server.clock.now += 601
    assert server.expire_idle() == ["alice/r1"] and not server.sessions
    assert _ask(server, _train_frame(s, 3, seed=3), "alice").header["message"] == NO_SESSION
    resume = _hello()
    resume.header["resume"] = True
    s = _open(server, "alice", resume)
    _assert_same_state(state, _state(server, s))
    # another identity cannot resume it: its key (and checkpoint) is its own
    reply = _ask(server, resume, "mallory")
    assert reply.kind == P.ERROR and "no server checkpoint" in reply.header["message"]


def test_a_busy_session_is_not_expired(tmp_path):
    server = _server(tmp_path, session_idle_s=600)
    s = _open(server, "alice")
    server.clock.now += 500
    _ask(server, _train_frame(s, 0, seed=0), "alice")
    server.clock.now += 500
    assert server.expire_idle() == [] and "alice/r1" in server.sessions


# ---- activation caches ---------------------------------------------------------------------------------
def test_a_cache_belongs_to_the_identity_that_opened_it(tmp_path):
    server = _server(tmp_path)
    hello = _cache_hello()
    reply = _ask(server, hello, "alice")
    alice = {"session": reply.header["session"], "secret": reply.header["secret"]}
    token = reply.header["cache_token"]
    keys = [f"k{i}" for i in range(6)]
    assert _ask(server, _target_frame(alice, 0, keys), "alice").header["cached"] is True
    # mallory presents alice's token: mallory gets an empty cache of its own under another token
    stolen = _ask(server, _cache_hello(token=token), "mallory")
    mallory = {"session": stolen.header["session"], "secret": stolen.header["secret"]}
    assert stolen.header["cached_keys"] == 0 and stolen.header["cache_token"] != token
    missing = _ask(server, Frame(kind=P.TRAIN_CACHED, header={**mallory, "step": 0, "keys": keys}), "mallory")
    assert missing.header["missing"] == keys  # nothing of alice's to train on, read or overwrite
    # alice's own new run reopens it with the token (and takes it over from the old session)
    hello2 = _cache_hello(token=token)
    hello2.header["run_id"] = "r2"
    again = _ask(server, hello2, "alice")
    assert again.header["cache_token"] == token and again.header["cached_keys"] == 6
    assert server.sessions["alice/r1"].store is None


def test_the_cache_quota_is_the_servers(tmp_path):
    server = _server(tmp_path, cache_memory_mb=0.0001, cache_disk_mb=0.0001)
    reply = _ask(server, _cache_hello(memory_limit_mb=10_000), "alice")
    s = {"session": reply.header["session"], "secret": reply.header["secret"]}
    assert server.sessions["alice/r1"].store.memory_limit_mb == pytest.approx(0.0001)
    first = _ask(server, _target_frame(s, 0, ["a", "b", "c", "d"]), "alice")
    assert first.kind == P.OK and first.header["cached"] is False  # beyond the quota: trained, not kept
    assert len(server.sessions["alice/r1"].store) == 0
