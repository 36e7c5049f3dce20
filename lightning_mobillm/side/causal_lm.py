"""A side network for causal-LM fine-tuning: a residual on the last tap, then the backbone's own output side.

The token-wise side trunk (:class:`~lightning_mobillm.side.parallel_adapters.ParallelAdapterTrunk`) maps each
token's taps ``[N, L, d]`` to a side state ``[N, d_side]``. :class:`ResidualLMHead` adds ``W_o`` of it to the
last tap (the hidden state after the backbone's final block, which must be tapped) and hands the sum to the
backbone's frozen final norm and LM head (:class:`OutputLayer`)::

    h = last_tap + W_o(trunk(taps)),   logits = lm_head(final_norm(h))

``W_o`` starts at zero, so at step 0 the logits are the backbone's own next-token logits (exactly, with float
taps; within the codec's error otherwise): an instruct model keeps its behaviour until training moves it.

The loss is a cross-entropy over the answer positions only, computed in chunks of tokens whose logits are
recomputed in the backward pass (``torch.utils.checkpoint``): ``N x V`` logits are never held at once (256
tokens of Gemma-3's 262k vocabulary are 268 MB in float32).

The output layer is public, frozen and the backbone's own: the server reads it from a checkpoint it trusts
(:meth:`OutputLayer.from_pretrained`, only the final norm and the LM head are read) and checks it against the
digest the device declares (:meth:`OutputLayer.digest`, the same bytes as
:meth:`~lightning_mobillm.backbone.FrozenBackbone.identity`'s ``digest``). It is kept out of the module's
parameters and ``state_dict``: a checkpoint of the side network holds only what was trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["OutputLayer", "ResidualLMHead", "chunked_cross_entropy", "tensor_digest"]


def tensor_digest(tensors: Iterable[Tensor]) -> str:
    """SHA-256 over each tensor's dtype, shape and bytes, in order: the digest a device declares of its backbone's
    output side (:meth:`~lightning_mobillm.backbone.FrozenBackbone.identity`) and the server checks."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{list(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().data)  # the bytes, without a copy
    return digest.hexdigest()


class OutputLayer:
    """The backbone's frozen final norm and LM head (``logits = F.linear(norm(h), weight)``, optionally
    soft-capped). A plain object, not a module: it is never trained and never saved with the side network.

    Args:
        norm: the backbone's final norm module (e.g. ``LlamaRMSNorm``, Gemma's ``(1 + w)`` RMSNorm).
        weight: the LM head's weight ``[V, d]`` (the input embedding when the two are tied).
        bias: the LM head's bias, if it has one.
        softcap: ``final_logit_softcapping`` of models that cap logits (``cap * tanh(logits / cap)``).
    """

    def __init__(self, norm: nn.Module, weight: Tensor, bias: Tensor | None = None,
                 softcap: float | None = None) -> None:
        self.norm = norm.requires_grad_(False).eval()
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.softcap = softcap
        self._digest: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def copy_to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> OutputLayer:
        """This layer on ``device`` in ``dtype`` (shares the tensors when nothing changes)."""
        norm = copy.deepcopy(self.norm).to(device=device, dtype=dtype)
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return OutputLayer(norm, self.weight.to(device=device, dtype=dtype), bias, self.softcap)

    def __call__(self, hidden: Tensor) -> Tensor:
        """Logits ``[..., V]`` of hidden states ``[..., d]`` (in the layer's dtype)."""
        h = self.norm(hidden.to(self.weight.dtype))
        logits = F.linear(h, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def tensors(self) -> Iterable[Tensor]:
        """The tensors the digest covers, in its order: the LM head's, then the final norm's."""
        yield self.weight
        if self.bias is not None:
            yield self.bias
        yield from (p for p in self.norm.parameters())

    @property
    def digest_value(self) -> str:
        """:meth:`digest`, computed once (the layer is frozen)."""
        if self._digest is None:
            self._digest = self.digest()
        return self._digest

    def digest(self) -> str:
        """:func:`tensor_digest` of :meth:`tensors`."""
        return tensor_digest(self.tensors())

    @classmethod
    def from_model(cls, model: nn.Module) -> OutputLayer:
        """The output side of a loaded Hugging Face causal LM (shared tensors, no copy of the head)."""
        head = model.get_output_embeddings()
        base = getattr(model, "base_model", model)
        norm = getattr(base, "norm", None)
        if head is None or not isinstance(norm, nn.Module):
            raise ValueError(f"{type(model).__name__} has no LM head and final norm (`get_output_embeddings()` and "
                             "`base_model.norm`) to build an output layer from")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(norm, head.weight, getattr(head, "bias", None), getattr(config, "final_logit_softcapping", None))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                        expect_digest: str | None = None) -> OutputLayer:
        """Read only the final norm and the LM head of a Hugging Face checkpoint folder (safetensors).

        The norm's class comes from the model's config (built on the meta device, nothing allocated), so
        architecture details such as Gemma's ``(1 + w)`` scale and its epsilon are the model's own.

        Args:
            folder: the checkpoint (``config.json`` and ``*.safetensors``).
            dtype: the dtype to load into (the digest is over the tensors in this dtype).
            expect_digest: refuse the checkpoint unless its :meth:`digest` is this one.
        """
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        base = getattr(skeleton, "base_model", skeleton)
        modules = {id(m): name for name, m in skeleton.named_modules()}
        norm, head, embed = getattr(base, "norm", None), skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
        if not isinstance(norm, nn.Module) or head is None or embed is None:
            raise ValueError(f"{type(skeleton).__name__} has no final norm (`base_model.norm`) and LM head to read")
        if set(dict(norm.named_parameters())) != {"weight"}:
            raise ValueError(f"{type(norm).__name__}: only a final norm with a single weight is supported")
        norm_prefix, head_prefix, embed_prefix = modules[id(norm)], modules[id(head)], modules[id(embed)]
        tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
        wanted = {f"{norm_prefix}.weight", f"{head_prefix}.weight", f"{head_prefix}.bias"}
        if tied:
            wanted.add(f"{embed_prefix}.weight")
        found: dict[str, Tensor] = {}
        files = sorted(folder.glob("*.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # a sharded checkpoint: open only the shards that hold what is wanted
            where = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / where[k] for k in wanted if k in where})
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in wanted & set(f.keys()):
                    found[key] = f.get_tensor(key).to(dtype)
        head_weight = found.get(f"{head_prefix}.weight")
        if head_weight is None and tied:
            head_weight = found.get(f"{embed_prefix}.weight")
        if head_weight is None or f"{norm_prefix}.weight" not in found:
            raise ValueError(f"{folder}: no LM head ({head_prefix}.weight or a tied {embed_prefix}.weight) and final "
                             f"norm ({norm_prefix}.weight) in its safetensors")
        norm = copy.deepcopy(norm).to_empty(device="cpu")
        norm.load_state_dict({"weight": found[f"{norm_prefix}.weight"]})
        norm.to(dtype)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        out = cls(norm, head_weight, found.get(f"{head_prefix}.bias"),
                  getattr(text_config, "final_logit_softcapping", None))
        if expect_digest is not None and out.digest_value != expect_digest:
            raise ValueError(f"{folder}: its final norm and LM head do not match the digest the device declared "
                             f"({out.digest_value[:16]}... against {expect_digest[:16]}...): a different checkpoint "
                             "or dtype")
        return out


def chunked_cross_entropy(hidden: Tensor, labels: Tensor, output: OutputLayer, chunk_tokens: int = 256,
                          reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``output(hidden)`` ``[N, V]`` against ``labels`` ``[N]``, ``chunk_tokens`` rows at a time;
    each chunk's logits are recomputed in the backward pass instead of being stored. ``reduction``: ``mean``
    or ``sum`` over the ``N`` tokens."""
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but labels {labels.shape[0]}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    def piece(h: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        total = total + (checkpoint(piece, h, y, use_reentrant=False) if h.requires_grad else piece(h, y))
    return total / max(1, hidden.shape[0]) if reduction == "mean" else total


class ResidualLMHead(nn.Module):
    """``W_o`` (zero-initialised, trained): side states ``[N, d_side]`` to a residual on the last tap ``[N, d]``;
    the frozen :class:`OutputLayer` turns the sum into next-token logits.

    The backbone's final norm divides the sum by its RMS, and a decoder's last hidden state is large (SmolLM2-
    135M: a median per-token RMS of about 34), so a plain residual reaches the logits 34 times weaker than its
    size, and Adam, whose steps do not scale with that, moves the prediction slowly. With ``scale="rms"``
    (default) the residual is measured in units of the base's own RMS, ``last_tap + rms(last_tap) * W_o(s)``,
    which after the norm is about ``W_o(s)`` added to the normalised state: the side network acts on the scale
    the LM head reads, whatever the backbone's magnitudes. ``scale="none"`` is the plain ``last_tap + W_o(s)``.
    Both are exactly the backbone at step 0.

    Args:
        in_features: the side trunk's width.
        hidden_size: the backbone's width ``d``.
        scale: ``"rms"`` or ``"none"``, as above.
        eps: added to the mean square before its root.
    """

    SCALES = ("rms", "none")

    def __init__(self, in_features: int, hidden_size: int, scale: Literal["rms", "none"] = "rms",
                 eps: float = 1e-6) -> None:
        super().__init__()
        if scale not in self.SCALES:
            raise ValueError(f"scale must be one of {self.SCALES}, got {scale!r}")
        self.scale, self.eps = scale, float(eps)
        self.out = nn.Linear(int(in_features), int(hidden_size))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, states: Tensor, last_tap: Tensor) -> Tensor:
        """The corrected hidden state ``last_tap + [rms(last_tap) *] W_o(states)``, ``[N, d]`` (in ``W_o``'s
        dtype)."""
        if states.shape[0] != last_tap.shape[0]:
            raise ValueError(f"states has {states.shape[0]} tokens but last_tap {last_tap.shape[0]}")
        base = last_tap.to(self.out.weight.dtype)
        residual = self.out(states.to(self.out.weight.dtype))
        if self.scale == "rms":
            residual = residual * base.pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()
        return base + residual
