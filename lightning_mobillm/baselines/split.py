"""Split learning over the framework's gRPC link: the device keeps the first ``k`` blocks, a server the rest.

Per training step the device runs the embeddings and blocks ``0..k-1`` (with LoRA on their attention
projections), sends the hidden state after block ``k-1`` of every non-pad token (packed, quantised with
``codec_up``) and the labels; the server runs blocks ``k..L-1``, the final norm and the head, steps its
own LoRA adapters and head, and sends back the gradient of the loss with respect to what it received
(``codec_down``). The device backpropagates that gradient through its blocks and steps its adapters.
Traffic goes both ways, every step waits for the server, and the device still runs a backward pass: the
costs MobiLLM is designed to avoid.

Positions are explicit (``0..n-1`` over each sample's real tokens) on both sides, so the split model
computes exactly what the whole model computes for left- or right-padded batches. Decoder backbones
(Llama, Qwen2, Gemma3, SmolLM2) only: the server feeds the received states as ``inputs_embeds``.

Faults: the split server checkpoints each session (by default after every step, since only the adapters,
the head and their optimizer are saved, with the last step's reply). When it becomes unreachable mid-run,
the device reconnects (restarting an embedded server on the same workdir), resumes the session and sends
the step in flight again: a server that had applied it answers with the stored gradient, one that had not
applies it now. That is exact only if the server's checkpoint is at the device's step (or one past it): the
device's half trains too and is not rolled back, so a server that lost more steps fails the run with an error
naming both steps rather than training a mismatched model. For the same reason a device checkpoint cannot
resume a run (``--ckpt_path``): it holds no server half, and resuming is refused with an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
import uuid
from typing import Any

from torch import Tensor, nn

from lightning_mobillm import protocol as P
from lightning_mobillm.backbone import add_lora, load_split_part, packed_positions
from lightning_mobillm.baselines.common import OnDeviceClassifier
from lightning_mobillm.client import INPROCESS, ServerClient, server_log_path
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.stats import DeviceStats
from lightning_mobillm.transport.frames import Frame, encode_frame
from lightning_mobillm.transport.link import LinkError

log = logging.getLogger(__name__)

__all__ = ["SplitLearningClassifier"]


class SplitLearningClassifier(OnDeviceClassifier):
    """The device half of split learning (see the module docstring).

    Args:
        split_layer: blocks the device keeps (``k``; the paper-style default 2 keeps the device light).
        r, alpha, lora_dropout, target_modules: LoRA on both halves (as :class:`LoRAClassifier`).
        server: ``"host:port"`` of a split server (``python -m lightning_mobillm serve --role split``); None
            starts one on loopback for this run; ``"inprocess"`` runs it in this process (tests, simulation).
        token_env: environment variable with the shared token (for an embedded server a fresh one is drawn).
        codec_up: codec of the activations sent up (``fp32``/``fp16``/``bf16``/``int8``/...).
        codec_down: codec of the gradients sent down (``bf16`` keeps fp32's range).
        embedded: settings of an embedded server (its ``allowed_backbones`` is set to this backbone; by default
            it checkpoints every step, so that it can be restarted exactly).
        connect_timeout, call_timeout: link timeouts in seconds.
        reconnect_timeout: how long to try to reach a server that became unreachable (0: fail at once).
        **kwargs: see :class:`~lightning_mobillm.baselines.common.OnDeviceClassifier` (``lr`` etc. apply
            to both halves; the server gets them in the hello).
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_classes: int | None = None,
        lr: float = 5e-4,
        split_layer: int = 2,
        r: int = 8,
        alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] | None = None,
        server: str | None = None,
        token_env: str = "MOBILLM_TOKEN",
        codec_up: str = "int8",
        codec_down: str = "bf16",
        embedded: ServerConfig | None = None,
        connect_timeout: float = 120.0,
        call_timeout: float = 600.0,
        reconnect_timeout: float = 120.0,
        **kwargs,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, lr=lr, **kwargs)
        self.lower: nn.Module | None = None
        self.embedded = embedded or ServerConfig(threads=1, checkpoint_every_n_steps=1)
        self.client: ServerClient | None = None
        # what DeviceMonitor reads: the device is busy for each batch less its waits for the server
        self.device_stats = DeviceStats(device_busy_s=None, device_forwards=None, run={"codec": codec_up})
        self.server_losses: list[float] = []
        self._step = 0
        self._hello: dict[str, Any] | None = None  # one run id for the whole fit (a reconnect resumes it)
        self.recoveries = 0

    # ---- networks -----------------------------------------------------------------------------
    def build(self) -> None:
        hp = self.hparams
        lower = load_split_part(self.backbone_config, int(hp["split_layer"]), "lower")
        self.lower = add_lora(lower, int(hp["r"]), int(hp["alpha"]), float(hp["lora_dropout"]), self.targets)

    @property
    def targets(self) -> list[str]:
        return list(self.hparams["target_modules"] or ["q_proj", "v_proj"])

    def device_states(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Packed hidden states after block ``k-1`` of the real tokens ``[N, d]`` and their lengths ``[B]``."""
        out = self.lower(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=packed_positions(attention_mask), use_cache=False)
        mask = attention_mask.bool()
        return out.last_hidden_state[mask], mask.sum(dim=1)

    # ---- link ---------------------------------------------------------------------------------
    def _hello_header(self) -> dict[str, Any]:
        hp = self.hparams
        fitting = self.trainer.state.fn == "fit"
        total = int(self.trainer.estimated_stepping_batches) if fitting else 1
        return {
            "device_id": os.uname().nodename,
            "run_id": uuid.uuid4().hex[:12],
            "backbone": self.backbone_config.to_dict(),
            "split_layer": int(hp["split_layer"]),
            "num_classes": self.num_classes,
            "total_steps": max(1, total),
            "hparams": P.json_safe({k: hp[k] for k in ("lr", "weight_decay", "betas", "warmup_ratio",
                                                       "min_lr_ratio", "label_smoothing", "dropout", "seed",
                                                       "r", "alpha", "lora_dropout")} | {"target_modules": self.targets}),
        }

    def _connect(self) -> None:
        hp = self.hparams
        address, token = hp["server"], os.environ.get(hp["token_env"])
        config = self.embedded
        if address is None or address == INPROCESS:
            token = secrets.token_hex(16)
            config = dataclasses.replace(self.embedded, token_env=hp["token_env"],
                                         allowed_backbones=[self.backbone_config.source])
        log_path = server_log_path(self.trainer)
        if address is None and config.workdir is None and log_path is not None:
            config = dataclasses.replace(config, workdir=str(log_path.parent))  # its checkpoints, in the run's folder
        self.client = ServerClient(address, token, role="split", embedded=config, log_path=log_path,
                                   connect_timeout=float(hp["connect_timeout"]),
                                   call_timeout=float(hp["call_timeout"])).open()
        self.device_stats.link = self.client.stats
        self._hello = self._hello_header()
        self.client.hello(P.SPLIT_HELLO, self._hello)
        self.device_stats.server_pid = self.client.server_pid

    def _request(self, frame: Frame) -> Frame:
        while True:
            try:
                return self._send(frame)
            except LinkError as err:
                self._recover(err)
                frame.header.update(self.client.session_header())  # the same frame, the new secret

    def _send(self, frame: Frame) -> Frame:
        if frame.kind != P.SPLIT_TRAIN:
            return self.client.request(frame)
        t0 = time.perf_counter()
        request = encode_frame(frame)
        data = self.client.call(request)
        self.device_stats.link_wait_s += time.perf_counter() - t0
        self.device_stats.train_bytes_up += len(request)
        reply = self.client.decode_reply(data)
        self.device_stats.add_server_reply(reply.header, len(data))
        return reply

    def _recover(self, err: LinkError) -> None:
        """The server is unreachable: reach it again (an embedded one is restarted) and resume the session from
        its checkpoint, which must be at this device's step (or one past it: the step in flight was applied)."""
        timeout = float(self.hparams.get("reconnect_timeout", 0.0))
        if timeout <= 0 or self._hello is None or not (
                err.code == "UNAVAILABLE" or self.client.embedded_server_alive is False):
            raise err
        log.warning("the split server is unreachable (%s); reconnecting to resume the session", err)
        self.client.reconnect(timeout)
        reply = self.client.hello(P.SPLIT_HELLO, {**self._hello, "resume": True})
        self.device_stats.server_pid = self.client.server_pid
        server_step = int(reply.header["step"])
        if server_step not in (self._step, self._step + 1):
            raise RuntimeError(
                f"the split server resumed its half at step {server_step}, but the device's half is at step "
                f"{self._step}: the device's adapters cannot be rolled back, so the run cannot continue exactly "
                "(let the split server checkpoint every step: server.checkpoint_every_n_steps: 1)")
        self.recoveries += 1

    def _frame(self, kind: str, states: Tensor, lengths: Tensor, **extra_tensors: Tensor) -> Frame:
        codec = self.hparams["codec_up"]
        tensors = P.pack_acts(states.detach()[:, None, :], lengths.cpu(), codec)
        header = self.client.session_header(codec=codec)
        if kind == P.SPLIT_TRAIN:
            header.update(step=self._step, codec_down=self.hparams["codec_down"])
        return Frame(kind=kind, header=header, tensors={**tensors, **extra_tensors})

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.client is None:
            self._connect()

    def teardown(self, stage: str) -> None:
        if self.client is not None:
            self.client.close()  # bye, close the link, stop an embedded server
            self.client = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        raise RuntimeError(
            "the split-learning baseline cannot resume: its server half is not checkpointed; start a new run"
        )

    # ---- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.client is None:
            self._connect()
        states, lengths = self.device_states(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"].long().cpu()
        reply = self._request(self._frame(P.SPLIT_TRAIN, states, lengths, labels=labels))
        self._step += 1
        grad, _ = P.unpack_acts(reply.tensors, reply.header["codec"])
        h = reply.header
        self.server_losses.append(float(h["loss"]))
        size = len(labels)
        self.log("train/loss", h["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/server_lr", h["lr"], on_step=True, on_epoch=False, batch_size=size)
        # d(loss)/d(device params) = sum over tokens of <states, grad>'s gradient: backpropagate the
        # server's gradient through the device blocks (Lightning calls backward on this surrogate).
        return (states * grad[:, 0].to(device=states.device, dtype=states.dtype)).sum()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.client is None:
            self._connect()
        states, lengths = self.device_states(input_ids, attention_mask)
        return self._request(self._frame(P.SPLIT_EVAL, states, lengths)).tensors["logits"].to(self.device)
