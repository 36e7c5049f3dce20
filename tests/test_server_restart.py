"""A server killed mid-run restarts from its own checkpoint and continues the same session's step count.

Real processes over the real gRPC link: the server is ``python -m lightning_mobillm serve`` (started as a
device starts its embedded server), killed with SIGKILL (no chance to clean up), and started again on the
same workdir.
"""

from __future__ import annotations

import pytest
import torch

from lightning_mobillm import protocol as P
from lightning_mobillm.client import EmbeddedServer, ServerClient, ServerError
from lightning_mobillm.modules import SideTuningModule
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig, TapSpec
from lightning_mobillm.transport.frames import Frame

SPEC = TapSpec(layers=[0, 1, 2], hidden_size=16, arch="llama", is_decoder=True)


def _hello(resume: bool = False) -> dict:
    module = SideTuningModule(backbone=BackboneConfig(source="unused"), num_classes=3, lr=1e-2, dropout=0.0)
    return {"device_id": "phone", "run_id": "run1", "module": "side_tuning", "side": module.side_config.to_dict(),
            "hparams": P.json_safe(module.server_hparams()), "tap_spec": SPEC.to_dict(), "num_classes": 3,
            "num_outputs": 3, "total_steps": 20, "codec": "fp32", "resume": resume}


def _train(client: ServerClient, step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    tensors = P.pack_acts(torch.randn(12, 3, 16, generator=g), torch.full((4,), 3), "fp32")
    tensors["labels"] = torch.randint(0, 3, (4,), generator=g)
    return client.request(Frame(kind=P.TRAIN, header={"step": step, "codec": "fp32"}, tensors=tensors)).header


def _connect(address: str) -> ServerClient:
    return ServerClient(address, "t0ken", connect_timeout=30, retries=0).open()


def test_killed_server_restarts_from_its_checkpoint_and_continues_the_session(tmp_path):
    config = ServerConfig(device="cpu", threads=1, workdir=str(tmp_path / "server"), checkpoint_every_n_steps=1)
    first = EmbeddedServer(config, "t0ken", log_path=tmp_path / "first.log")
    client = _connect(first.start(timeout=120))
    try:
        client.hello(P.HELLO, _hello())
        for step in range(3):
            assert _train(client, step)["server_steps"] == step + 1
        before = client.pull_state()
    finally:
        client.link.close()
        first.proc.kill()  # SIGKILL: no bye, no shutdown handler
        first.proc.wait()
        first.proc = None

    second = EmbeddedServer(config, "t0ken", log_path=tmp_path / "second.log")
    client = _connect(second.start(timeout=120))
    try:
        reply = client.hello(P.HELLO, _hello(resume=True))
        assert reply.header["step"] == 3  # the session continues where the killed server left it
        after = client.pull_state()
        assert after["step"] == 3
        for name, tensor in before["model"].items():
            assert torch.equal(tensor, after["model"][name]), name
        assert after["scheduler"] == before["scheduler"]
        adam_before, adam_after = before["optimizer"]["state"], after["optimizer"]["state"]
        assert adam_before.keys() == adam_after.keys() and adam_before
        for idx in adam_before:
            for key, value in adam_before[idx].items():
                assert torch.equal(value, adam_after[idx][key]), (idx, key)
        # a replay of step 2 from before the crash is refused as out of order, not applied again
        with pytest.raises(ServerError, match="out-of-order train frame: got step 2, expected 3"):
            _train(client, 2)
        assert _train(client, 3)["server_steps"] == 4
    finally:
        client.close()
        second.stop()


def test_resume_without_a_checkpoint_is_refused_by_name(tmp_path):
    config = ServerConfig(device="cpu", threads=1, workdir=str(tmp_path / "empty"))
    server = EmbeddedServer(config, "t0ken", log_path=tmp_path / "server.log")
    client = _connect(server.start(timeout=120))
    try:
        with pytest.raises(ServerError, match="no server checkpoint of session 'device:phone/run1'"):
            client.hello(P.HELLO, _hello(resume=True))
    finally:
        client.close()
        server.stop()
