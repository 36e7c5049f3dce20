"""``ServerAssistedStrategy`` (registered as ``mobillm``): the device's side of a MobiLLM split.

The Trainer's process is the device. It holds the frozen backbone and the data, runs the backbone
forward only, and streams the tapped activations (quantised by :class:`QuantizedTransfer`) to a server
process over gRPC. The side network's training step, backward pass, optimizer and scheduler run only in
the server process. The device keeps a copy of the side network's weights (no gradients, refreshed from
the server for checkpoints and at the end of ``fit``) so a trained module can also run locally.

Overlap: training frames go through an ordered queue; the device forwards batch ``k+1`` while the
server trains on batch ``k``. ``pipeline_depth`` bounds how many frames may be in flight (0 = wait for
every reply).

Faults: when the server becomes unreachable (a call fails with UNAVAILABLE after the link's retries), the
device reconnects (an embedded server is restarted on the same workdir; a remote one is tried for up to
``reconnect_timeout`` seconds), resumes the same run's session from the server's last checkpoint (a hello
with ``resume: true``) and replays, from a device-side buffer of the raw batches, exactly the steps after
that checkpoint, frames in flight included: every batch enters the server's optimizer history once. Ctrl-C
and teardown are bounded in time (:meth:`ServerClient.close`). See ``docs/architecture.md``, "Faults and
recovery".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
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
from lightning_mobillm.faults import fault_point
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.stats import DeviceStats
from lightning_mobillm.strategies.eval_cache import EvalTapCache
from lightning_mobillm.transport.codecs import tokenwise
from lightning_mobillm.transport.frames import Frame, encode_frame
from lightning_mobillm.transport.link import LinkError

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


class ReplayBuffer:
    """The raw training batches (token ids, masks, labels, cache keys: copies on the CPU) of the steps the
    server has not made durable yet, kept on the device to be sent again after a server crash. Never sent
    anywhere but to the same session, as the frames they were."""

    def __init__(self) -> None:
        self._steps: OrderedDict[int, tuple[dict[str, Tensor], list[str] | None]] = OrderedDict()

    def add(self, step: int, batch: dict[str, Tensor], keys: list[str] | None) -> None:
        kept = {k: v.detach().to("cpu", copy=True) for k, v in batch.items() if isinstance(v, Tensor)}
        self._steps[step] = (kept, keys)

    def get(self, step: int) -> tuple[dict[str, Tensor], list[str] | None]:
        return self._steps[step]

    def drop_before(self, step: int) -> None:
        while self._steps and next(iter(self._steps)) < step:
            self._steps.popitem(last=False)

    def clear(self) -> None:
        self._steps.clear()

    @property
    def first_step(self) -> int | None:
        return next(iter(self._steps), None)

    def __len__(self) -> int:
        return len(self._steps)


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
        select: which tokens' activations are sent: ``auto`` (the default) asks the module which tokens can
            reach its loss (:meth:`SideTuningModule.token_selection`: the loss token alone for a head pooling
            it, the same loss for far fewer bytes); ``all`` non-pad tokens (the MobiLLM paper's
            configuration); only the ``loss`` token (the PAE shortcut); the ``answer`` positions of a generative
            module (those whose next token is in the answer: :meth:`SideTuningModule.token_positions`).
            Evaluation sends what ``auto`` would when training sends ``all`` (:attr:`eval_select`: the same
            scores, as there is no gradient; not with the outlier-aware codecs).
        inference: where validation/test/predict run the side network: on the ``server`` (during ``fit``
            always) or ``local``ly on the device with weights downloaded from the server.
        embedded: settings of the embedded server (ignored when ``server`` is set).
        device_id: the name this device gives itself in frames (default: hostname-pid).
        connect_timeout: seconds to keep trying to reach the server before failing.
        call_timeout: deadline of one call, seconds.
        retries: retries of a call that failed with UNAVAILABLE.
        reconnect_timeout: how long to keep trying to reach a server that became unreachable (a restarted
            embedded server, or a remote one coming back) before the run fails; 0 fails at once.
        backbone_device: where the backbone runs on the device (``cpu`` on a phone-class device).
        eval_cache_mb: device memory for the frame tensors of validation batches, so that a validation batch
            seen before is sent without a backbone forward (:class:`EvalTapCache`; the backbone is frozen);
            0 forwards every validation batch every time. Only ``fit`` caches (it validates the same batches
            again and again); ``validate``, ``test`` and ``predict`` batches are forwarded.
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
        select: Literal["auto", "all", "loss", "answer"] = "auto",
        inference: Literal["server", "local"] = "server",
        embedded: ServerConfig | None = None,
        device_id: str | None = None,
        connect_timeout: float = 60.0,
        call_timeout: float = 600.0,
        retries: int = 3,
        reconnect_timeout: float = 300.0,
        backbone_device: str = "cpu",
        eval_cache_mb: float = 16.0,
    ) -> None:
        super().__init__(device=backbone_device)
        if pipeline_depth < 0:
            raise ValueError(f"pipeline_depth must be >= 0, got {pipeline_depth}")
        if select not in ("auto", "all", "loss", "answer"):
            raise ValueError(f"select must be 'auto', 'all', 'loss' or 'answer', got {select!r}")
        self.server_address = server
        self.token = read_token(token_env, token_file) or (None if server else uuid.uuid4().hex)
        self.token_env = token_env
        self.tls = {"ca_file": tls_ca_file, "cert_file": tls_cert_file, "key_file": tls_key_file,
                    "server_name": tls_server_name}
        self.pipeline_depth = pipeline_depth
        self.select = select
        self._auto_select: Literal["all", "loss", "answer"] | None = None  # what auto means for this module (setup_environment)
        self.inference = inference
        self.embedded = embedded or ServerConfig()
        self.device_id = device_id or f"{socket.gethostname()}-{os.getpid()}"
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.retries = retries
        self.reconnect_timeout = reconnect_timeout
        self.eval_cache = EvalTapCache(eval_cache_mb)

        self.backbone: FrozenBackbone | None = None
        self.transfer: QuantizedTransfer | None = None
        self.cache: ActivationCache | None = None
        self.client: ServerClient | None = None
        self._server_state: dict | None = None
        # ---- recovery: one run id for the whole fit, what the session was given, the batches to replay ----
        self.run_id: str | None = None
        self._hello_header: dict[str, Any] | None = None
        self._with_cache = False  # the session asked for an activation cache (PAE, while fitting)
        self._resumed_run: dict[str, Any] = {}  # from a --ckpt_path checkpoint (load_checkpoint)
        self._base: dict[str, Any] | None = None  # the last state the device knows the server had (and its step)
        self._replay = ReplayBuffer()
        self._next_step = 0  # training steps sent so far (the next step's number)
        self._replied = 0  # the next step whose reply the device has not processed yet
        self._server_checkpoint_step = 0
        self._ack_step: dict[str, int] = {}  # cache key -> the step whose reply acknowledged it
        self._interrupted = False
        #: server crashes recovered from, and training steps sent again after them
        self.recoveries = 0
        self.replayed_steps = 0
        #: what this device spends (read by DeviceMonitor); outlives the connection, for summaries
        self.device_stats = DeviceStats(overlaps_server=pipeline_depth > 0,
                                        run={"select": select, "pipeline_depth": pipeline_depth})

    # ---- the interface callbacks use (they call these from their own ``setup`` hook) ----------------
    def use_transfer(self, transfer: QuantizedTransfer) -> None:
        """Send activations with this callback's codec."""
        self.transfer = transfer

    def use_cache(self, cache: ActivationCache) -> None:
        """Let this callback name training samples so that the server can keep their activations."""
        if self.token_select not in ("loss", "answer"):
            raise ValueError("ActivationCache needs the loss token (trainer.strategy.init_args.select: loss, or auto "
                             "with a module that pools it) or a generative module's answer tokens (select: answer); "
                             f"it is {self.select!r}, which sends {self.token_select!r} tokens")
        self.cache = cache

    @property
    def eval_select(self) -> Literal["all", "loss", "answer"]:
        """The tokens evaluation and prediction send: the module's own choice (what ``auto`` resolves to) when
        training sends every token (``select: all``) with a codec that encodes each token on its own: with no
        gradient only the tokens that reach the prediction matter, and the side network is token-wise, so the
        scores are the same for a fraction of the bytes. Otherwise training's tokens (an outlier-aware codec
        picks its channels over the frame's tokens, so fewer tokens would change the loss token's bytes)."""
        select = self.token_select
        narrow = select == "all" and self._auto_select is not None and tokenwise(self.transfer.codec)
        return self._auto_select if narrow else select

    @property
    def token_select(self) -> Literal["all", "loss", "answer"]:
        """The tokens this run sends: ``select``, with ``auto`` resolved once the module is built."""
        if self.select != "auto":
            return self.select
        if self._auto_select is None:
            raise RuntimeError("select: auto is resolved once the backbone is loaded (setup_environment)")
        return self._auto_select

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
        choose = getattr(module, "token_selection", None)  # a module without it gets every token
        self._auto_select = choose(self.backbone.is_decoder) if choose is not None else "all"
        per_token = bool(getattr(module, "labels_per_token", False))
        if per_token != (self.token_select == "answer"):
            raise ValueError(f"select: {self.select!r} sends {self.token_select!r} tokens, but "
                             f"{type(module).__name__} {'trains on' if per_token else 'has no'} answer tokens: use "
                             f"select: {'answer (or auto)' if per_token else 'auto, all or loss'}")

    def setup(self, trainer) -> None:
        if self.transfer is None:  # callbacks' setup hooks ran before this one
            self.transfer = QuantizedTransfer()
            log.info("no QuantizedTransfer callback configured; sending %s", self.transfer.codec)
        self.device_stats.run["codec"] = self.transfer.codec
        self.device_stats.run["select"] = self.token_select
        self.device_stats.run["eval_select"] = self.eval_select
        super().setup(trainer)
        if self.client is None:
            self._connect()  # after checkpoint restore, so a resumed run finds its activation cache
        module = self.lightning_module
        module.requires_grad_(False)  # the device never holds side-network gradients
        fitting = trainer.state.fn == TrainerFn.FITTING
        total = max(1, int(trainer.estimated_stepping_batches) if fitting else 1)
        module.device_setup(self.backbone, trainer.datamodule)
        if self.run_id is None:
            # a run resumed with --ckpt_path goes on as the same run (its session, if the server still holds
            # it), unless it now plans another number of steps (a longer schedule is another session's)
            prev = self._resumed_run
            same = fitting and prev.get("total_steps") == total and prev.get("run_id")
            self.run_id = prev["run_id"] if same else uuid.uuid4().hex[:12]
        self._hello_header = {
            "device_id": self.device_id,
            "run_id": self.run_id,
            "module": module.server_module_name,
            "side": module.side_config.to_dict(),
            "hparams": P.json_safe(module.server_hparams()),
            "backbone": self.backbone.identity(),
            "tap_spec": module.tap_spec.to_dict(),
            "num_classes": int(module.num_classes),
            "num_outputs": int(module.num_outputs),
            "total_steps": total,
            "codec": self.transfer.codec,
        }
        self._with_cache = self.cache is not None and fitting
        self._hello()
        fault_point("device:after_hello", server_pid=self.server_pid)
        # The device's copy of the weights (fresh init, or restored from a checkpoint) is the truth; a checkpoint
        # with the server's state pushes all of it later (load_optimizer_state_dict)
        self._base = {"model": module.state_dict(), "step": 0}
        if not (fitting and self._resumed_run.get("server_state")):
            self.client.push_state(self._base)

    def _hello(self, *, resume: bool = False) -> Frame:
        header = dict(self._hello_header)
        if self._with_cache:
            header["cache"] = self.cache.hello()  # with the token of the cache opened before, if any
        if resume:
            header["resume"] = True
        reply = self.client.hello(P.HELLO, header)
        self.device_stats.server_pid = self.client.server_pid
        if self._with_cache:
            self.cache.on_hello_reply(reply.header)
        return reply

    def on_train_start(self) -> None:
        super().on_train_start()
        step = self.lightning_module.trainer.global_step
        self._next_step = self._replied = step
        self._replay.clear()
        if self._base is not None and self._base["step"] != step:
            # started at a step the device cannot rebuild by itself: replays need the server's checkpoints
            self._base = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        # the previous step and its batch-end hooks (a ModelCheckpoint at that step) are done
        fault_point("device:after_train_step", step=self.lightning_module.trainer.global_step,
                    server_pid=self.server_pid)

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._interrupted = True  # teardown does not wait for replies nobody will read

    def setup_optimizers(self, trainer) -> None:
        self.optimizers = [ServerOptimizer()]
        self.lr_scheduler_configs = []

    def teardown(self) -> None:
        # bounded in time: replies in flight are waited for a few seconds at most (none after an exception
        # or Ctrl-C), the bye gets a short deadline, an embedded server is stopped (SIGTERM, then SIGKILL)
        client, self.client = self.client, None
        try:
            if client is not None:
                client.close(drain_timeout=0.0 if self._interrupted else 5.0)
        finally:
            self.run_id = self._hello_header = self._base = None
            self._resumed_run = {}
            self._replay.clear()
            self._ack_step.clear()
            self.eval_cache.clear()
            self._interrupted = False
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
    def fetch_server_state(self, model_only: bool = False) -> dict:
        """Wait for in-flight steps, then download the side network, optimizer, scheduler and step (with
        ``model_only``: the side network and step, what generation and the end of ``fit`` need)."""
        self._drain()
        return self._resilient(lambda: self.client.pull_state(model_only=model_only))

    def _forward(self, batch: dict[str, Tensor], select: str | None = None) -> tuple[dict[str, Tensor], BackboneOutput]:
        """Run the backbone (with the LM-head logits the module composes with, if any), its taps quantised into
        frame tensors inside the hooks as the forward runs (the float ``[N, L, d]`` stack never exists).
        ``select``: the tokens sent (default: training's, :attr:`token_select`)."""
        module = self.lightning_module
        select = select or self.token_select
        positions = module.token_positions(batch) if select == "answer" else None
        out = self.backbone(batch["input_ids"], batch["attention_mask"], select=select,
                            label_token_ids=module.backbone_label_token_ids,
                            sink=self.transfer.layer_encoder, positions=positions)
        self.device_stats.device_forwards += 1
        return self.transfer.pack_written(out.sink, out.lengths), out

    def _train_frame(self, step: int, batch: dict[str, Tensor], keys: list[str] | None) -> bytes:
        """Forward a training batch and build its frame; the module says what it carries besides the
        activations (labels, or a device-defined target) and in which kind of frame."""
        batch = {k: v.to(self.root_device) if isinstance(v, Tensor) else v for k, v in batch.items()}
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
        self.device_stats.train_samples += self.lightning_module.batch_size(batch)
        keys = self.cache.sample_keys(batch["input_ids"], batch["attention_mask"]) if self.cache else None
        self._replay.add(step, batch, keys)  # before anything is sent: a crash from here on replays it
        self._next_step = step + 1
        try:
            if keys is not None and self.cache.all_cached(keys):
                self._train_from_cache(step, batch, keys, t0)
            else:
                data = self._train_frame(step, batch, keys)
                self._account_busy(t0, len(data))
                self.client.submit(data, tag=(step, keys))
                fault_point("device:frame_in_flight", step=step, server_pid=self.server_pid)
                while self.client.in_flight > self.pipeline_depth or self.client.oldest_done():
                    self._complete_oldest()
        except LinkError as err:
            self._recover(err)  # replays this step too
        return torch.tensor(self.device_stats.last_train_reply.get("loss", float("nan")))

    def _account_busy(self, t0: float, frame_bytes: int) -> None:
        epoch = self.lightning_module.trainer.current_epoch
        self.device_stats.add_device_step(epoch, time.perf_counter() - t0, frame_bytes)

    def _train_from_cache(self, step: int, batch: dict[str, Tensor], keys: list[str], t0: float) -> None:
        """The server holds every sample of this batch: send the keys only, no device forward."""
        self._drain()  # the device is idle in cached epochs, so ordering is kept simply by waiting
        if self._replied > step:
            return  # the server crashed meanwhile and this step was replayed with the others
        self._send_cached(step, batch, keys, t0)

    def _send_cached(self, step: int, batch: dict[str, Tensor], keys: list[str], t0: float) -> None:
        frame = Frame(kind=P.TRAIN_CACHED, header=self.client.session_header(step=step, keys=keys))
        data = encode_frame(frame)
        self._account_busy(t0, len(data))
        reply = self.client.call(data)
        header = self.client.decode_reply(reply).header
        if "missing" in header:
            # lost or corrupt on the server: forward this batch again and resend the same step
            self.device_stats.add_server_reply(header, len(reply))
            log.warning("server lost %d cached samples; forwarding the batch again", len(header["missing"]))
            self.cache.on_missing(header["missing"])
            t1 = time.perf_counter()
            data = self._train_frame(step, batch, keys)
            self._account_busy(t1, len(data))
            reply = self.client.call(data)
        else:
            self.cache.on_hits(keys)
        self._on_train_reply(step, reply, keys)

    def _complete_oldest(self) -> None:
        (step, keys), data = self.client.complete_oldest()
        self._on_train_reply(step, data, keys)

    def _on_train_reply(self, step: int, data: bytes, keys: list[str] | None) -> None:
        reply = self.client.decode_reply(data).header
        if reply.get("step") != step:
            raise ServerError(f"server answered step {reply.get('step')} for step {step}")
        if self.cache is not None:
            self.cache.on_server_reply(reply, keys)
            if reply.get("cached") and keys is not None:
                self._ack_step.update(dict.fromkeys(keys, step))
        self._server_checkpoint_step = max(self._server_checkpoint_step, int(reply.get("checkpoint_step", 0)))
        self._trim_replay()
        self.device_stats.add_server_reply(reply, len(data))  # replayed steps' bytes are on the link too
        if step < self._replied:
            return  # a step replayed after a crash, whose first reply was logged already
        self._replied = step + 1
        module = self.lightning_module
        if module is not None and module._current_fx_name == "training_step":
            module.log("train/loss", reply["loss"], prog_bar=True, on_step=True, on_epoch=True)
            if "acc" in reply:
                module.log("train/acc", reply["acc"], on_step=True, on_epoch=True)
            module.log("train/lr", reply["lr"], on_step=True)

    def _drain(self) -> None:
        try:
            while self.client is not None and self.client.in_flight:
                self._complete_oldest()
        except LinkError as err:
            self._recover(err)  # replays every step in flight, so nothing is left to wait for

    # ---- recovery from a server crash ---------------------------------------------------------------
    def _trim_replay(self) -> None:
        """Batches before the server's last checkpoint (or the last state the device holds) are not needed."""
        base_step = self._base["step"] if self._base is not None else 0
        self._replay.drop_before(max(self._server_checkpoint_step, base_step))

    def _recoverable(self, err: Exception) -> bool:
        if not isinstance(err, LinkError) or self.client is None or self._hello_header is None:
            return False
        if self.reconnect_timeout <= 0:
            return False
        return err.code == "UNAVAILABLE" or self.client.embedded_server_alive is False

    def _resilient(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; when the server is unreachable, recover (reconnect, resume, replay) and call it again."""
        while True:
            try:
                return fn()
            except LinkError as err:
                self._recover(err)

    def _recover(self, err: LinkError) -> None:
        """Reach the server again, resume this run's session and replay the steps it lost; raises ``err`` when
        it is not a lost server or when the server cannot be reached within ``reconnect_timeout``."""
        if not self._recoverable(err):
            raise err
        deadline = time.monotonic() + self.reconnect_timeout
        log.warning("the server is unreachable (%s); reconnecting to resume session %s", err, self.run_id)
        while True:
            try:
                self.client.reconnect(max(0.0, deadline - time.monotonic()))
                self._resume_and_replay()
                self.recoveries += 1
                return
            except LinkError as again:
                if not self._recoverable(again) or time.monotonic() >= deadline:
                    raise
                log.warning("recovery failed (%s); trying again", again)

    def _resume_and_replay(self) -> None:
        """Resume the session from the server's checkpoint (or give a fresh session the last state the device
        holds), forget the cache entries the server lost, and send every step after it again, in order."""
        try:
            reply, resumed = self._hello(resume=True), True
        except ServerError as err:
            if "no server checkpoint" not in str(err):
                raise
            reply, resumed = self._hello(), False  # a fresh session of the same run
        step = int(reply.header["step"]) if resumed else 0
        if self.cache is not None and self._with_cache:
            # the server's cache holds what its checkpoint flushed: entries acknowledged from `step` on are gone
            lost = [k for k, s in self._ack_step.items() if s >= step and self.cache.all_cached([k])]
            if lost:
                self.cache.on_missing(lost)
            for k in lost:
                del self._ack_step[k]
        first = self._replay.first_step if len(self._replay) else self._next_step
        if not resumed or step < first or step > self._next_step:
            if self._base is None or self._base["step"] < first or self._base["step"] > self._next_step:
                raise RuntimeError(
                    f"cannot recover: the server {'resumed at step ' + str(step) if resumed else 'lost the session'}"
                    f", the device holds the batches of steps {first}..{self._next_step - 1}"
                    + ("" if self._base is None else f" and the server state at step {self._base['step']}"))
            self.client.push_state(self._base)
            step = self._base["step"]
        self._server_checkpoint_step = step
        log.warning("session %s resumed at step %d; replaying %d step(s) to step %d", self.run_id, step,
                    self._next_step - step, self._next_step - 1)
        for s in range(step, self._next_step):
            batch, keys = self._replay.get(s)
            t0 = time.perf_counter()
            if keys is not None and self.cache.all_cached(keys):
                self._send_cached(s, batch, keys, t0)
            else:
                data = self._train_frame(s, batch, keys)
                self._account_busy(t0, len(data))
                self._on_train_reply(s, self.client.call(data), keys)
            self.replayed_steps += 1

    def backward(self, closure_loss: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return closure_loss  # backpropagation happens on the server

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        return optimizer.step(closure)

    def on_train_end(self) -> None:
        # The device's copy of the side network becomes the trained one.
        state = self.fetch_server_state(model_only=True)
        self.lightning_module.load_state_dict(state["model"])

    # ---- evaluation ---------------------------------------------------------------------------------
    def _scores(self, batch: dict[str, Tensor], *, reuse: bool = False) -> Tensor:
        """Class scores for a batch, composed on the device by the module from the side network's outputs
        (and the backbone's own prediction, for modules that compose with it). With ``reuse`` (validation) a
        batch whose taps the :class:`EvalTapCache` holds is not forwarded again."""
        select = self.eval_select
        key = EvalTapCache.key(batch, codec=self.transfer.codec, select=select) if reuse else None
        cached = self.eval_cache.get(key) if key is not None else None
        if cached is None:
            tensors, out = self._forward(batch, select)
            if key is not None:
                self.eval_cache.put(key, tensors, out)
        else:
            tensors, out = cached
            self.device_stats.eval_cache_hits += 1
        module = self.lightning_module
        if self.inference == "local" and module.trainer.state.fn != TrainerFn.FITTING:
            acts, lengths = P.unpack_acts(tensors, self.transfer.codec)
            with torch.no_grad():
                side = module(acts, lengths).float()
        else:
            self._drain()
            reply = self._resilient(lambda: self.client.request(
                Frame(kind=P.EVAL, header={"codec": self.transfer.codec}, tensors=tensors)))
            side = reply.tensors["logits"]
        return module.device_scores(out, side)

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        # only fit validates the same batches more than once (a validate() or test() call runs each once)
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        scores = self._scores(batch, reuse=stage == "val" and fitting and self.eval_cache.enabled)
        module = self.lightning_module
        labels = module.device_labels(batch).to(scores.device)
        module.update_eval_metrics(stage, scores, labels, loss=module.device_eval_loss(scores, labels))
        return {"logits": scores}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, *args: Any) -> Any:
        result = self._eval_step("val", batch)
        fault_point("device:during_validation", batch_idx=batch_idx, server_pid=self.server_pid)
        return result

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, *args: Any) -> Any:
        return self._eval_step("test", batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, *args: Any) -> Any:
        predict = getattr(self.lightning_module, "device_predict", None)
        if predict is not None:  # a generative module writes texts on the device
            return predict(self.backbone, batch)
        logits = self._scores(batch)
        return {"logits": logits, "preds": logits.argmax(-1), "index": batch.get("index")}

    # ---- checkpoints --------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.session is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            self._server_state = self.fetch_server_state()
            self.lightning_module.load_state_dict(self._server_state["model"])
            # the server's whole state at this step: what a server that lost the session is given back
            self._base = self._server_state
            self._trim_replay()
        return super().lightning_module_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self._server_state is not None:
            checkpoint["mobillm_server"] = {k: v for k, v in self._server_state.items() if k != "model"}
            self._server_state = None
        if self.run_id is not None and self._hello_header is not None:
            checkpoint["mobillm_run"] = {"run_id": self.run_id, "total_steps": self._hello_header["total_steps"]}
        fault_point("device:during_checkpoint", step=checkpoint.get("global_step"), server_pid=self.server_pid)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        self._resumed_run = {**(checkpoint.get("mobillm_run") or {}),
                             "server_state": checkpoint.get("mobillm_server") is not None}
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        server = checkpoint.get("mobillm_server")
        if server is None:
            log.warning("checkpoint has no server state; the side network's optimizer starts afresh")
            return
        self._base = {"model": self.lightning_module.state_dict(), **server}
        self.client.push_state(self._base)
        log.info("server state restored at step %d", server["step"])

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="MobiLLM device/server split")


if ServerAssistedStrategy.strategy_name not in StrategyRegistry:
    ServerAssistedStrategy.register_strategies(StrategyRegistry)
