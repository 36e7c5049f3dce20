"""``ServerAssistedStrategy`` (registered as ``mobillm``): the device's side of a MobiLLM split.

The Trainer's process is the device. It holds the frozen backbone and the data, runs the backbone
forward only, and streams the tapped activations (quantised by :class:`QuantizedTransfer`) to a server
process over gRPC. The side network's training step, backward pass, optimizer and scheduler run only in
the server process. The device keeps a copy of the side network's weights (no gradients, refreshed from
the server for checkpoints and at the end of ``fit``) so a trained module can also run locally.

Overlap: training frames go through an ordered queue; the device forwards batch ``k+1`` while the
server trains on batch ``k``. ``pipeline_depth`` bounds how many frames may be in flight (0 = wait for
every reply).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lightning_mobillm import protocol as P
from lightning_mobillm.backbone import BackboneOutput, FrozenBackbone
from lightning_mobillm.callbacks.activation_cache import ActivationCache
from lightning_mobillm.callbacks.quantized_transfer import QuantizedTransfer
from lightning_mobillm.client import INPROCESS, ServerClient, ServerError, read_token, server_log_path
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.stats import DeviceStats
from lightning_mobillm.transport.frames import Frame, encode_frame

log = logging.getLogger(__name__)


class ServerOptimizer(torch.optim.Optimizer):
    """Stands in on the device for the optimizer that lives on the server.

    Lightning's loop calls ``step(closure)``; the closure runs the strategy's training step, which sends
    the batch's activations to the server. It holds one dummy scalar and no state.
    """

    def __init__(self) -> None:
        super().__init__([torch.zeros(1)], {"lr": 0.0})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class ServerAssistedStrategy(SingleDeviceStrategy):
    """Split a fine-tuning run between this (device) process and a side-network server process.

    Args:
        server: ``host:port`` of a running server (``python -m lightning_mobillm serve``). ``None`` starts
            an embedded server: a separate process on 127.0.0.1 at a free port, stopped with the run.
            ``inprocess`` runs the server's handler in this process (frames encoded, validated and counted
            as on the network; for tests and simulation).
        token_env: environment variable holding the device's token (never a config key: a token must not
            end up in a saved ``config.yaml``); an embedded server gets a fresh random one.
        token_file: a file holding the device's token (instead of ``token_env``).
        tls_ca_file: the CA certificate that signed the server's (PEM): the link runs over TLS.
        tls_cert_file, tls_key_file: this device's certificate and key, for a server that asks for mutual TLS.
        tls_server_name: the name to check the server's certificate against, when it is not the address's host.
        pipeline_depth: training frames allowed in flight while the device forwards the next batch
            (0 = synchronous).
        select: which tokens' activations are sent: ``all`` non-pad tokens (MobiLLM) or only the ``loss``
            token (the PAE shortcut).
        inference: where validation/test/predict run the side network: on the ``server`` (during ``fit``
            always) or ``local``ly on the device with weights downloaded from the server.
        embedded: settings of the embedded server (ignored when ``server`` is set).
        device_id: the name this device gives itself in frames (default: hostname-pid).
        connect_timeout: seconds to keep trying to reach the server before failing.
        call_timeout: deadline of one call, seconds.
        retries: retries of a call that failed with UNAVAILABLE.
        backbone_device: where the backbone runs on the device (``cpu`` on a phone-class device).
    """

    strategy_name = "mobillm"

    def __init__(
        self,
        server: str | None = None,
        token_env: str = "MOBILLM_TOKEN",
        token_file: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_server_name: str | None = None,
        pipeline_depth: int = 1,
        select: Literal["all", "loss"] = "all",
        inference: Literal["server", "local"] = "server",
        embedded: ServerConfig | None = None,
        device_id: str | None = None,
        connect_timeout: float = 60.0,
        call_timeout: float = 600.0,
        retries: int = 3,
        backbone_device: str = "cpu",
    ) -> None:
        super().__init__(device=backbone_device)
        if pipeline_depth < 0:
            raise ValueError(f"pipeline_depth must be >= 0, got {pipeline_depth}")
        self.server_address = server
        self.token = read_token(token_env, token_file) or (None if server else uuid.uuid4().hex)
        self.token_env = token_env
        self.tls = {"ca_file": tls_ca_file, "cert_file": tls_cert_file, "key_file": tls_key_file,
                    "server_name": tls_server_name}
        self.pipeline_depth = pipeline_depth
        self.select = select
        self.inference = inference
        self.embedded = embedded or ServerConfig()
        self.device_id = device_id or f"{socket.gethostname()}-{os.getpid()}"
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.retries = retries

        self.backbone: FrozenBackbone | None = None
        self.transfer: QuantizedTransfer | None = None
        self.cache: ActivationCache | None = None
        self.client: ServerClient | None = None
        self._server_state: dict | None = None
        #: what this device spends (read by DeviceMonitor); outlives the connection, for summaries
        self.device_stats = DeviceStats(overlaps_server=pipeline_depth > 0,
                                        run={"select": select, "pipeline_depth": pipeline_depth})

    # ---- the interface callbacks use (they call these from their own ``setup`` hook) ----------------
    def use_transfer(self, transfer: QuantizedTransfer) -> None:
        """Send activations with this callback's codec."""
        self.transfer = transfer

    def use_cache(self, cache: ActivationCache) -> None:
        """Let this callback name training samples so that the server can keep their activations."""
        if self.select != "loss":
            raise ValueError("ActivationCache needs trainer.strategy.init_args.select: loss (one token per sample)")
        self.cache = cache

    # ---- lifecycle ----------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.backbone.tokenizer if self.backbone is not None else None

    @property
    def server_pid(self) -> int | None:
        return self.device_stats.server_pid

    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.lightning_module
        if self.backbone is None:
            self.backbone = FrozenBackbone(module.backbone_config, device=self.root_device)
        num_classes = getattr(module.hparams, "num_classes", None) or getattr(
            getattr(self.lightning_module.trainer, "datamodule", None), "num_classes", None
        )
        if not module.is_built:
            module.build(self.backbone.tap_spec, num_classes=num_classes)

    def setup(self, trainer) -> None:
        if self.transfer is None:  # callbacks' setup hooks ran before this one
            self.transfer = QuantizedTransfer()
            log.info("no QuantizedTransfer callback configured; sending %s", self.transfer.codec)
        self.device_stats.run["codec"] = self.transfer.codec
        super().setup(trainer)
        if self.client is None:
            self._connect()  # after checkpoint restore, so a resumed run finds its activation cache
        module = self.lightning_module
        module.requires_grad_(False)  # the device never holds side-network gradients
        fitting = trainer.state.fn == TrainerFn.FITTING
        total = int(trainer.estimated_stepping_batches) if fitting else 1
        module.device_setup(self.backbone, trainer.datamodule)
        reply = self.client.hello(
            P.HELLO,
            {
                    "device_id": self.device_id,
                    "run_id": uuid.uuid4().hex[:12],
                    "module": module.server_module_name,
                    "side": module.side_config.to_dict(),
                    "hparams": P.json_safe(module.server_hparams()),
                    "backbone": self.backbone.identity(),
                    "tap_spec": module.tap_spec.to_dict(),
                    "num_classes": int(module.num_classes),
                    "num_outputs": int(module.num_outputs),
                    "total_steps": max(1, total),
                    "codec": self.transfer.codec,
                    **({"cache": self.cache.hello()} if self.cache is not None and fitting else {}),
            },
        )
        self.device_stats.server_pid = self.client.server_pid
        if self.cache is not None and fitting:
            self.cache.on_hello_reply(reply.header)
        # The device's copy of the weights (fresh init, or restored from a checkpoint) is the truth.
        self.client.push_state({"model": module.state_dict(), "step": 0})

    def setup_optimizers(self, trainer) -> None:
        self.optimizers = [ServerOptimizer()]
        self.lr_scheduler_configs = []

    def teardown(self) -> None:
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - tearing down after a failure must still stop the server
            log.debug("pending frames failed during teardown", exc_info=True)
        if self.client is not None:
            self.client.close()  # bye, close the link, stop an embedded server
            self.client = None
        super().teardown()

    # ---- connection ---------------------------------------------------------------------------------
    @property
    def session(self) -> str | None:
        return self.client.session if self.client is not None else None

    def _connect(self) -> None:
        config = dataclasses.replace(self.embedded, token_env=self.token_env)
        module = self.lightning_module
        log_path = server_log_path(module.trainer if module is not None else None)
        if self.server_address in (None, INPROCESS) and config.workdir is None:
            # activation caches live in the run's folder, and a resumed run reuses its first folder
            remembered = self.cache.workdir if self.cache is not None else None
            config.workdir = remembered or (str(log_path.parent) if log_path is not None else None)
        if self.cache is not None:
            self.cache.remember_workdir(config.workdir)
        self.client = ServerClient(self.server_address, self.token, role="side", embedded=config, log_path=log_path,
                                   connect_timeout=self.connect_timeout, call_timeout=self.call_timeout,
                                   retries=self.retries, tls=self.tls).open()
        self.device_stats.link = self.client.stats

    # ---- requests -----------------------------------------------------------------------------------
    def fetch_server_state(self) -> dict:
        """Wait for in-flight steps, then download the side network, optimizer, scheduler and step."""
        self._drain()
        return self.client.pull_state()

    def _forward(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], BackboneOutput]:
        """Run the backbone (with the LM-head logits the module composes with, if any) and quantise its
        taps into frame tensors."""
        out = self.backbone(batch["input_ids"], batch["attention_mask"], select=self.select,
                            label_token_ids=self.lightning_module.backbone_label_token_ids)
        self.device_stats.device_forwards += 1
        return self.transfer.pack(out.acts, out.lengths), out

    def _train_frame(self, step: int, batch: dict[str, Tensor], keys: list[str] | None) -> bytes:
        """Forward a training batch and build its frame; the module says what it carries besides the
        activations (labels, or a device-defined target) and in which kind of frame."""
        tensors, out = self._forward(batch)
        kind, extra = self.lightning_module.training_payload(batch, out)
        header = self.client.session_header(step=step, codec=self.transfer.codec)
        if keys is not None:
            header["keys"] = keys
        return encode_frame(Frame(kind=kind, header=header, tensors={**tensors, **extra}))

    # ---- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        trainer = self.lightning_module.trainer
        step = trainer.global_step
        t0 = time.perf_counter()
        self.device_stats.train_samples += int(batch["labels"].numel())
        keys = self.cache.sample_keys(batch["input_ids"], batch["attention_mask"]) if self.cache else None
        if keys is not None and self.cache.all_cached(keys):
            self._train_from_cache(step, batch, keys, t0)
        else:
            data = self._train_frame(step, batch, keys)
            self._account_busy(t0, len(data))
            self.client.submit(data, tag=(step, keys))
            while self.client.in_flight > self.pipeline_depth or self.client.oldest_done():
                self._complete_oldest()
        return torch.tensor(self.device_stats.last_train_reply.get("loss", float("nan")))

    def _account_busy(self, t0: float, frame_bytes: int) -> None:
        epoch = self.lightning_module.trainer.current_epoch
        self.device_stats.add_device_step(epoch, time.perf_counter() - t0, frame_bytes)

    def _train_reply(self, data: bytes) -> dict[str, Any]:
        reply = self.client.decode_reply(data).header
        self.device_stats.add_server_reply(reply, len(data))
        return reply

    def _train_from_cache(self, step: int, batch: dict[str, Tensor], keys: list[str], t0: float) -> None:
        """The server holds every sample of this batch: send the keys only, no device forward."""
        self._drain()  # the device is idle in cached epochs, so ordering is kept simply by waiting
        frame = Frame(kind=P.TRAIN_CACHED, header=self.client.session_header(step=step, keys=keys))
        data = encode_frame(frame)
        self._account_busy(t0, len(data))
        reply = self._train_reply(self.client.call(data))
        if "missing" in reply:
            # lost or corrupt on the server: forward this batch again and resend the same step
            log.warning("server lost %d cached samples; forwarding the batch again", len(reply["missing"]))
            self.cache.on_missing(reply["missing"])
            t1 = time.perf_counter()
            data = self._train_frame(step, batch, keys)
            self._account_busy(t1, len(data))
            reply = self._train_reply(self.client.call(data))
        else:
            self.cache.on_hits(keys)
        self._on_train_reply(step, reply, keys)

    def _complete_oldest(self) -> None:
        (step, keys), data = self.client.complete_oldest()
        self._on_train_reply(step, self._train_reply(data), keys)

    def _on_train_reply(self, step: int, reply: dict[str, Any], keys: list[str] | None) -> None:
        if reply.get("step") != step:
            raise ServerError(f"server answered step {reply.get('step')} for step {step}")
        if self.cache is not None:
            self.cache.on_server_reply(reply, keys)
        module = self.lightning_module
        if module is not None and module._current_fx_name == "training_step":
            module.log("train/loss", reply["loss"], prog_bar=True, on_step=True, on_epoch=True)
            if "acc" in reply:
                module.log("train/acc", reply["acc"], on_step=True, on_epoch=True)
            module.log("train/lr", reply["lr"], on_step=True)

    def _drain(self) -> None:
        while self.client is not None and self.client.in_flight:
            self._complete_oldest()

    def backward(self, closure_loss: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return closure_loss  # backpropagation happens on the server

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        return optimizer.step(closure)

    def on_train_end(self) -> None:
        # The device's copy of the side network becomes the trained one.
        state = self.fetch_server_state()
        self.lightning_module.load_state_dict(state["model"])

    # ---- evaluation ---------------------------------------------------------------------------------
    def _scores(self, batch: dict[str, Tensor]) -> Tensor:
        """Class scores for a batch, composed on the device by the module from the side network's outputs
        (and the backbone's own prediction, for modules that compose with it)."""
        tensors, out = self._forward(batch)
        module = self.lightning_module
        if self.inference == "local" and module.trainer.state.fn != TrainerFn.FITTING:
            acts, lengths = P.unpack_acts(tensors, self.transfer.codec)
            with torch.no_grad():
                side = module(acts, lengths).float()
        else:
            self._drain()
            reply = self.client.request(Frame(kind=P.EVAL, header={"codec": self.transfer.codec}, tensors=tensors))
            side = reply.tensors["logits"]
        return module.device_scores(out, side)

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        scores = self._scores(batch)
        labels = batch["labels"].to(scores.device)
        module = self.lightning_module
        module.update_eval_metrics(stage, scores, labels, loss=module.device_eval_loss(scores, labels))
        return {"logits": scores}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, *args: Any) -> Any:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, *args: Any) -> Any:
        return self._eval_step("test", batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, *args: Any) -> Any:
        logits = self._scores(batch)
        return {"logits": logits, "preds": logits.argmax(-1), "index": batch.get("index")}

    # ---- checkpoints --------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.session is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            self._server_state = self.fetch_server_state()
            self.lightning_module.load_state_dict(self._server_state["model"])
        return super().lightning_module_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self._server_state is not None:
            checkpoint["mobillm_server"] = {k: v for k, v in self._server_state.items() if k != "model"}
            self._server_state = None
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        server = checkpoint.get("mobillm_server")
        if server is None:
            log.warning("checkpoint has no server state; the side network's optimizer starts afresh")
            return
        self.client.push_state({"model": self.lightning_module.state_dict(), **server})
        log.info("server state restored at step %d", server["step"])

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="MobiLLM device/server split")


if ServerAssistedStrategy.strategy_name not in StrategyRegistry:
    ServerAssistedStrategy.register_strategies(StrategyRegistry)
