"""The server half of the split-learning baseline (``python -m lightning_mobillm serve --role split``).

Unlike the MobiLLM side server it loads a backbone: blocks ``k..L-1``, the final norm, LoRA adapters and
a classification head, for each device session. It only loads backbones its config allows
(``ServerConfig.allowed_backbones``; by default the packaged offline models), never remote code. Frames
are validated like every other frame of the framework; a refused frame changes nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mobillm import protocol as P
from lightning_mobillm.assets import PACKAGED_MODELS
from lightning_mobillm.backbone import add_lora, load_split_part
from lightning_mobillm.optim import adamw_warmup_cosine
from lightning_mobillm.server.dispatch import FrameServer, SessionBase, check_name
from lightning_mobillm.server.engine import TrainingEngine
from lightning_mobillm.side.heads import LastTokenHead
from lightning_mobillm.specs import BackboneConfig
from lightning_mobillm.transport import codecs
from lightning_mobillm.transport.frames import Frame, FrameError

log = logging.getLogger("lightning_mobillm.server")

__all__ = ["SplitServer"]


class SplitHalf(nn.Module):
    """The server's half: blocks ``k..L-1`` with LoRA, the final norm, and the classification head."""

    def __init__(self, upper: nn.Module, head: LastTokenHead) -> None:
        super().__init__()
        self.upper = upper
        self.head = head

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-pad the packed states, run the upper blocks with positions ``0..n-1``, classify the last token."""
        device = states.device
        batch, seqlen = int(lengths.numel()), int(lengths.max())
        mask = torch.arange(seqlen, device=device)[None, :] < lengths[:, None]
        dtype = next(self.upper.parameters()).dtype
        padded = states.new_zeros(batch, seqlen, states.shape[-1]).to(dtype)
        padded = padded.masked_scatter(mask[..., None], states.to(dtype))
        positions = torch.arange(seqlen, device=device).expand(batch, seqlen)
        out = self.upper(inputs_embeds=padded, attention_mask=mask.long(), position_ids=positions,
                         use_cache=False).last_hidden_state
        return self.head(out[torch.arange(batch, device=device), lengths - 1])


@dataclass
class SplitSession(SessionBase):
    engine: TrainingEngine
    num_classes: int
    hidden_size: int
    label_smoothing: float

    @property
    def step(self) -> int:
        return self.engine.step

    @property
    def half(self) -> SplitHalf:
        return self.engine.module


class SplitServer(FrameServer):
    """Per device session: the upper blocks with LoRA + head, their AdamW and schedule."""

    schemas = P.SPLIT_REQUEST_SCHEMAS
    hello_kinds = (P.SPLIT_HELLO,)
    sessions: dict[str, SplitSession]

    def _allowed(self, source: str) -> bool:
        allowed = self.config.allowed_backbones
        return source in (allowed if allowed is not None else PACKAGED_MODELS)

    def _on_split_hello(self, frame: Frame, identity: str) -> Frame:
        h = frame.header
        P.check_protocol(h)
        owner = self.owner_of(identity, h["device_id"])
        key = f"{owner}/{check_name('run_id', h['run_id'])}"
        try:
            backbone = BackboneConfig(**h["backbone"])
        except (TypeError, ValueError) as err:
            raise FrameError(f"bad backbone in hello: {err}") from None
        if not self._allowed(backbone.source) or backbone.trust_remote_code:
            raise FrameError(f"this server does not load backbone {backbone.source!r} "
                             f"(allowed: {self.config.allowed_backbones or sorted(PACKAGED_MODELS)}; no remote code)")
        hp = h["hparams"]
        if not 2 <= h["num_classes"] <= self.config.max_outputs or not 1 <= h["total_steps"] <= 10**9:
            raise FrameError(f"hello needs num_classes in [2, {self.config.max_outputs}] and total_steps >= 1")
        live = self._open_or_reuse(key, owner)
        if live is not None:
            with live.lock:
                secret = self._admit(live, owner, identity)
            log.info("split session %s reconnected at step %d", key, live.step)
            return self._hello_reply(live, secret)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(hp.get("seed", 0)))
                upper = load_split_part(backbone, h["split_layer"], "upper")
                upper = add_lora(upper, int(hp["r"]), int(hp["alpha"]), float(hp["lora_dropout"]),
                                 list(hp["target_modules"]))
                hidden = int(upper.config.hidden_size)
                head = LastTokenHead(hidden, h["num_classes"], float(hp.get("dropout", 0.1)))
            half = SplitHalf(upper, head)
            optimizer, scheduler = adamw_warmup_cosine(
                half.parameters(), lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.0),
                betas=hp.get("betas", (0.9, 0.999)), total_steps=int(h["total_steps"]),
                warmup_ratio=hp.get("warmup_ratio", 0.0), min_lr_ratio=hp.get("min_lr_ratio", 0.0),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise FrameError(f"cannot build the split server's half: {err}") from None
        engine = TrainingEngine(self.fabric, half, optimizer, scheduler, grad_clip=self.config.grad_clip)
        session = SplitSession(key, engine, h["num_classes"], hidden, float(hp.get("label_smoothing", 0.0)))
        secret = self._admit(session, owner, identity)
        log.info("split session %s: %s from block %d, %d trainable parameters on %s", key, backbone.source,
                 h["split_layer"], sum(p.numel() for g in optimizer.param_groups for p in g["params"]), self.device)
        return self._hello_reply(session, secret)

    def _hello_reply(self, session: SplitSession, secret: str) -> Frame:
        return Frame(kind=P.OK, header={"session": session.key, "secret": secret, "server_pid": os.getpid(),
                                        "server_device": str(self.device), "step": session.step})

    def _inputs(self, session: SplitSession, frame: Frame) -> tuple[torch.Tensor, torch.Tensor]:
        n, layers, packed = frame.tensors["acts.q"].shape  # bounded before anything is dequantised
        if n > self.config.max_tokens_per_frame:
            raise FrameError(f"{n} tokens in one frame; this server allows {self.config.max_tokens_per_frame}")
        if layers != 1 or packed > session.hidden_size:
            raise FrameError(f"states shape [{n}, {layers}, {packed}] != [N, 1, {session.hidden_size}]")
        acts, lengths = P.unpack_acts(frame.tensors, frame.header["codec"])
        n, layers, width = acts.shape
        if width != session.hidden_size:
            raise FrameError(f"states shape [{n}, {layers}, {width}] != [N, 1, {session.hidden_size}]")
        if lengths.numel() == 0 or bool((lengths < 1).any()) or int(lengths.sum()) != n:
            raise FrameError(f"lengths must be >= 1 and sum to N={n}")
        if not torch.isfinite(acts).all():
            raise FrameError("states are not finite after decoding")
        return acts[:, 0].to(self.device), lengths.to(self.device)

    def _on_split_train(self, frame: Frame, session: SplitSession) -> bytes:
        step = frame.header["step"]
        codec = frame.header["codec_down"]
        if codec not in codecs.CODECS:
            raise FrameError(f"codec_down {codec!r} is not one of {list(codecs.CODECS)}")
        with session.lock:
            if (replayed := self._replayed(session, frame)) is not None:
                return replayed
            states, lengths = self._inputs(session, frame)
            labels = frame.tensors["labels"].to(self.device)
            if labels.shape != lengths.shape or bool((labels < 0).any() | (labels >= session.num_classes).any()):
                raise FrameError(f"labels must be [B] in [0, {session.num_classes})")
            states.requires_grad_(True)

            def compute_loss() -> tuple[torch.Tensor, torch.Tensor]:
                logits = session.engine.model(states, lengths)
                return F.cross_entropy(logits.float(), labels, label_smoothing=session.label_smoothing), logits

            result = session.engine.train_step(compute_loss)
            tensors = P.pack_acts(states.grad.float()[:, None, :].cpu(), lengths.cpu(), codec)
            header = {"step": step, "codec": codec, "loss": result.loss, "server_step_s": result.seconds,
                      "lr": result.lr, "acc": float((result.outputs.argmax(-1) == labels).float().mean())}
            return self._remember(session, frame, Frame(kind=P.OK, header=header, tensors=tensors))

    @torch.no_grad()
    def _on_split_eval(self, frame: Frame, session: SplitSession) -> Frame:
        with session.lock:
            states, lengths = self._inputs(session, frame)
            session.engine.model.eval()
            logits = session.engine.model(states, lengths)
        return Frame(kind=P.OK, tensors={"logits": logits.float().cpu().contiguous()})

    def _on_bye(self, frame: Frame, session: SplitSession) -> Frame:
        self._pop_session(session)
        log.info("split session %s closed after %d steps", session.key, session.step)
        return Frame(kind=P.OK)
