"""The device's frozen backbone: load any Hugging Face decoder or encoder, run it forward only, tap blocks.

Taps are forward hooks on the model's own blocks (no forked model code). A tap is the hidden state a
block returns, i.e. the residual stream after that block; for the last block of a decoder this is the
state *before* the final norm (Hugging Face's ``hidden_states[-1]`` comes after it), so every tap is
the same kind of quantity.

Efficiency (this runs on every device batch):

* hooks are registered for one call and removed in ``finally``; nothing is held between calls;
* each hook immediately keeps only the selected tokens and writes them into one preallocated
  ``[N, L, d]`` buffer, so full ``[B, T, d]`` states are never accumulated;
* without logits, the base model runs without the LM head and the forward is stopped right after the
  deepest tapped block, so later blocks cost nothing;
* with logits, only the loss token's logits are computed (``logits_to_keep``) and the K verbalizer
  columns are kept.

Padding: a batch is moved to right padding (a stable per-row reordering of the token ids, a no-op for
right-padded batches) before it enters the model. A left-padded sample then gets exactly the positions
it would have unpadded, for any model (rotary, learned absolute positions as in BERT, RoBERTa's offset
positions, sliding windows), so taps and logits do not depend on the padding side. Packed outputs are
in token order either way.
"""

from __future__ import annotations

import inspect
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from lightning_mobillm.assets import PACKAGED_MODELS, is_packaged, resolve_source
from lightning_mobillm.side.causal_lm import tensor_digest
from lightning_mobillm.specs import BackboneConfig, TapSpec

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Model types that are bidirectional encoders even though some of them have a causal-LM head class.
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "distilbert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "mpnet",
        "camembert",
        "modernbert",
        "ernie",
        "nomic_bert",
        "megatron-bert",
        "roformer",
        "xlnet",
        "funnel",
        "data2vec-text",
        "esm",
        "big_bird",
        "canine",
        "luke",
        "mobilebert",
        "squeezebert",
        "nystromformer",
        "rembert",
    }
)

# Where the block list lives, tried in order (dotted attribute paths from the loaded model).
_BLOCK_PATHS = (
    "model.layers",  # Llama, Gemma3, Qwen2, Mistral, Phi3 ... (XForCausalLM)
    "layers",  # their base models
    "model.language_model.layers",  # multimodal wrappers
    "language_model.layers",
    "model.decoder.layers",  # OPT (ForCausalLM)
    "decoder.layers",  # OPT base
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom (ForCausalLM)
    "h",
    "gpt_neox.layers",
    "encoder.layer",  # BERT, RoBERTa, ELECTRA ... (base models)
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "transformer.layer",  # DistilBERT
    "distilbert.transformer.layer",
)


class _StopForward(Exception):
    """Raised in the deepest tapped block's hook to skip the rest of the model."""


@dataclass
class BackboneOutput:
    """What one backbone forward gives the device.

    Attributes:
        acts: ``[N, L, d]`` packed taps: the selected tokens of all samples, concatenated in sample order
            (and position order within a sample); ``L`` = number of tapped layers, in the order of
            ``tap_spec.layers``; in the backbone's dtype. ``None`` when the forward wrote them to a ``sink``.
        lengths: ``[B]`` int64, the number of selected tokens of each sample (sums to ``N``).
        logits: ``[B, K]`` float32, the frozen LM head's logits restricted to ``label_token_ids`` at the
            loss token, or ``None`` when not requested.
    """

    acts: torch.Tensor | None
    lengths: torch.Tensor
    logits: torch.Tensor | None = None
    sink: TapSink | None = None

    def split(self) -> tuple[torch.Tensor, ...]:
        """The per-sample ``[n_b, L, d]`` views of ``acts``."""
        if self.acts is None:
            raise RuntimeError("this forward wrote its taps to a sink; there is no acts tensor to split")
        return torch.split(self.acts, self.lengths.tolist(), dim=0)


class TapSink(Protocol):
    """Where a forward with ``sink=`` writes its taps, layer by layer, instead of an ``[N, L, d]`` tensor (the
    device's codec: :class:`lightning_mobillm.transport.codecs.LayerEncoder`)."""

    def write(self, j: int, x: torch.Tensor) -> None:
        """Take tapped layer ``j``'s ``[N, d]`` selected tokens (they are not kept by the backbone)."""


def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    return None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks, found generically.

    Known attribute paths are tried first (``model.layers``, ``layers``, ``encoder.layer``,
    ``transformer.h``...); otherwise the largest ``nn.ModuleList`` whose length equals the config's
    ``num_hidden_layers`` (shallowest first on ties).
    """
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    n = _num_hidden_layers(model)
    candidates = [
        (name.count("."), name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    if not candidates:
        raise ValueError(f"Cannot find the transformer blocks of {type(model).__name__}")
    if n is None:
        candidates.sort(key=lambda c: (-len(c[2]), c[0]))
    else:
        candidates.sort(key=lambda c: c[0])
    return candidates[0][2]


def _hidden_from_output(output: object) -> torch.Tensor:
    """A block's output may be a tensor, a tuple/list whose first item is the hidden state, or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise TypeError(f"Unexpected block output type {type(output).__name__}")


def _resolve_layers(layers: list[int] | str, num_blocks: int) -> list[int]:
    if layers == "all":
        return list(range(num_blocks))
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)):
        raise ValueError(f"layers must be 'all' or a list of block indices, got {layers!r}")
    if len(layers) == 0:
        raise ValueError("layers must not be empty: tap at least one block (or use 'all')")
    out: list[int] = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"Layer index {i!r} is not an integer")
        if not -num_blocks <= i < num_blocks:
            raise ValueError(
                f"Layer index {i} is out of range: the backbone has {num_blocks} blocks "
                f"(valid indices 0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)"
            )
        j = i % num_blocks
        if j in out:
            raise ValueError(f"Layer index {i} (block {j}) is tapped twice in {list(layers)}")
        out.append(j)
    return out


def is_decoder_config(config: object) -> bool:
    """Decoder (causal LM) or encoder, from the config's ``model_type``."""
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"Encoder-decoder models ({model_type}) are not supported as backbones")
    if model_type in ENCODER_MODEL_TYPES:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _set_pad_token(tokenizer, source: str) -> None:
    if tokenizer.pad_token is not None:
        return
    packaged_pad = PACKAGED_MODELS[source].pad_token if is_packaged(source) else None
    if packaged_pad is not None and packaged_pad in tokenizer.get_vocab():
        tokenizer.pad_token = packaged_pad
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        logger.warning(
            "The tokenizer of %s has neither a pad nor an eos token; batches cannot be padded", source
        )


def resolve_backbone(config: BackboneConfig) -> str:
    """The folder (or hub id) ``from_pretrained`` loads for ``config``, converted into the cache in the
    run's dtype where that makes loading cheaper (:func:`lightning_mobillm.assets.storage_dtype`)."""
    return resolve_source(config.source, config.gguf_file, revision=config.revision, dtype=config.dtype)


def load_tokenizer(config: BackboneConfig):
    """The backbone's tokenizer (``PreTrainedTokenizerBase``), with a pad token set (eos if it had none)."""
    from transformers import AutoTokenizer

    path = resolve_backbone(config)
    kwargs = {"trust_remote_code": config.trust_remote_code}
    if config.revision is not None and not is_packaged(config.source) and config.gguf_file is None:
        kwargs["revision"] = config.revision
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    _set_pad_token(tokenizer, config.source)
    return tokenizer


def load_hf_model(config: BackboneConfig, *, lm_head: bool) -> tuple[nn.Module, str]:
    """Load the Hugging Face model a :class:`BackboneConfig` names, in its dtype; returns (model, local path).

    ``lm_head=True`` loads decoders with their LM head (``AutoModelForCausalLM``); otherwise, and for
    encoders, the bare model (``AutoModel``) whose output is the last hidden state.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = resolve_backbone(config)
    kwargs: dict = {"trust_remote_code": config.trust_remote_code}
    if config.revision is not None and path == config.source:
        kwargs["revision"] = config.revision
    hf_config = AutoConfig.from_pretrained(path, **kwargs)
    cls = AutoModelForCausalLM if lm_head and is_decoder_config(hf_config) else AutoModel
    model = cls.from_pretrained(path, config=hf_config, dtype=_torch_dtype(config.dtype), **kwargs)
    return model, path


def verbalizer_token_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """The first token id of ``" " + word`` for each class's verbalizer word (a zero-shot prompt's answer).

    Leading tokens that decode to pure whitespace (some SentencePiece tokenizers split off ``"▁"``) are
    skipped. Warns if two words share their first token (their logits, and so their classes' priors, would
    be identical: give the classes words of their own).
    """
    ids: list[int] = []
    for name in words:
        toks = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        while len(toks) > 1 and not tokenizer.decode(toks[:1]).strip():
            toks = toks[1:]
        if not toks:
            raise ValueError(f"The class name {name!r} tokenizes to nothing")
        ids.append(int(toks[0]))
    seen: dict[int, str] = {}
    for name, i in zip(words, ids):
        if i in seen:
            warnings.warn(
                f"The class names {seen[i]!r} and {name!r} share their first token "
                f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i}); their verbalizer logits are identical",
                stacklevel=2,
            )
        else:
            seen[i] = name
    return ids


def loss_token_index(attention_mask: torch.Tensor, is_decoder: bool) -> torch.Tensor:
    """``[B]`` index of the token that enters the loss.

    Decoders: the last non-pad token; encoders: the first non-pad token ([CLS]). Works for left and
    right padding.
    """
    mask = attention_mask.to(torch.bool)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("Every sample needs at least one non-pad token (a row of attention_mask is all 0)")
    if is_decoder:
        positions = torch.arange(mask.shape[1], device=mask.device)
        return torch.where(mask, positions, -1).amax(dim=1).to(torch.long)
    return mask.to(torch.uint8).argmax(dim=1).to(torch.long)


class FrozenBackbone:
    """A frozen Hugging Face model that runs forward only and returns packed taps of chosen blocks.

    A plain class (not an ``nn.Module``) on purpose: put into a ``LightningModule`` it must not add its
    weights to checkpoints, the model summary or the optimizer. ``parameters()`` and ``to()`` are there
    for convenience. Outputs of :meth:`forward` are inference tensors (``torch.inference_mode``):
    ``.clone()`` them outside inference mode before using them in autograd.

    Args:
        config: which backbone, dtype and taps.
        device: where the backbone runs.
    """

    def __init__(self, config: BackboneConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.dtype = _torch_dtype(config.dtype)
        model, path = load_hf_model(config, lm_head=True)
        hf_config = model.config
        self._path = path
        self.is_decoder = is_decoder_config(hf_config)
        model.requires_grad_(False)
        model.eval()
        self.model = model.to(self.device)
        self.tokenizer = load_tokenizer(config)
        if (
            getattr(self.model.config, "pad_token_id", None) is None
            and self.tokenizer.pad_token_id is not None
        ):
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

        # The model without its head: what runs when no logits are requested.
        self.base_model: nn.Module = model.base_model if self.is_decoder else model
        self.blocks = find_blocks(self.base_model)
        self.num_blocks = len(self.blocks)
        self.layers = _resolve_layers(config.layers, self.num_blocks)
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self.hidden_size = int(getattr(text_config, "hidden_size", 0) or getattr(text_config, "d_model", 0))
        self.tap_spec = TapSpec(
            layers=list(self.layers),
            hidden_size=self.hidden_size,
            arch=str(hf_config.model_type),
            is_decoder=self.is_decoder,
        )
        self._accepts_logits_to_keep = self.is_decoder and _accepts(self.model, "logits_to_keep")
        self._lock = threading.Lock()
        logger.info(
            "Loaded backbone %s (%s, %s, %d blocks, d=%d) from %s; tapping %d blocks",
            config.source,
            self.tap_spec.arch,
            "decoder" if self.is_decoder else "encoder",
            self.num_blocks,
            self.hidden_size,
            path,
            len(self.layers),
        )

    # ------------------------------------------------------------------ conveniences
    def identity(self) -> dict:
        """What a server may know of this backbone: its type, a name (never a local path), its shape, and
        a SHA-256 of its output-side weights (the final norm and the LM head, or the output embedding),
        the tensors a server would need to match to compute next-token distributions."""
        source = self.config.source
        name = source if is_packaged(source) else Path(source).name
        output = self.model.get_output_embeddings() if self.is_decoder else None
        final_norm = getattr(self.base_model, "norm", None)
        digest = tensor_digest(p for m in (output, final_norm) if isinstance(m, nn.Module) for p in m.parameters())
        return {"arch": self.tap_spec.arch, "name": name, "hidden_size": self.hidden_size,
                "num_layers": self.num_blocks, "is_decoder": self.is_decoder, "digest": digest}

    @property
    def num_taps(self) -> int:
        return len(self.layers)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def to(self, device: str | torch.device) -> FrozenBackbone:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def eval(self) -> FrozenBackbone:
        return self

    def close(self) -> None:
        """Drop the model (frees its memory). The object is unusable afterwards."""
        self.model = None  # type: ignore[assignment]
        self.base_model = None  # type: ignore[assignment]
        self.blocks = None  # type: ignore[assignment]

    def __call__(self, *args, **kwargs) -> BackboneOutput:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"FrozenBackbone(source={self.config.source!r}, arch={self.tap_spec.arch!r}, "
            f"blocks={self.num_blocks}, d={self.hidden_size}, taps={len(self.layers)}, dtype={self.config.dtype})"
        )

    # ------------------------------------------------------------------ token selection
    def loss_token_index(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` index of the token that enters the loss (see :func:`loss_token_index`)."""
        return loss_token_index(attention_mask, self.is_decoder)

    def verbalizer_token_ids(self, class_names: list[str]) -> list[int]:
        """:func:`verbalizer_token_ids` with this backbone's tokenizer."""
        return verbalizer_token_ids(self.tokenizer, class_names)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        select: Literal["all", "loss", "answer"] = "all",
        label_token_ids: list[int] | None = None,
        sink: Callable[[int, int, int], TapSink] | None = None,
        positions: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """Run the frozen backbone and return the packed taps (and optionally the verbalizer logits).

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (left or right; the batch is
                run right-padded and trimmed to its longest sample, so results do not depend on padding).
            select: ``"all"`` keeps every non-pad token in order; ``"loss"`` keeps one token per sample
                (:meth:`loss_token_index`); ``"answer"`` keeps the tokens ``positions`` marks, in order (a
                generative run: the positions whose next token is in the answer).
            label_token_ids: if given (decoders only), also return the LM head's logits for these token ids
                at the loss token.
            sink: ``sink(N, L, d)`` makes the :class:`TapSink` that each layer's hook hands its selected tokens
                to as the forward runs (the device's codec quantises them into the frame), so the float
                ``[N, L, d]`` stack is never allocated; the output then has ``acts=None`` and ``sink`` set.
            positions: ``[B, T]`` bool, with ``select="answer"``: the tokens to keep (real tokens only; at least
                one per sample), in the same layout as ``input_ids``.
        """
        if self.model is None:
            raise RuntimeError("This FrozenBackbone was closed")
        if select not in ("all", "loss", "answer"):
            raise ValueError(f"select must be 'all', 'loss' or 'answer', got {select!r}")
        if (select == "answer") != (positions is not None):
            raise ValueError("select='answer' takes the positions to keep, and only it does")
        if label_token_ids is not None and not self.is_decoder:
            raise ValueError(
                f"label_token_ids needs a causal LM head; {self.tap_spec.arch} is an encoder backbone"
            )
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [B, T]; got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        input_ids = input_ids.to(self.device, torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)
        self.loss_token_index(attention_mask)  # validates: every sample has a token
        if positions is not None:
            positions = positions.to(self.device, torch.bool)
            if positions.shape != input_ids.shape:
                raise ValueError(f"positions must be [B, T] like input_ids, got {tuple(positions.shape)}")
            if bool((positions & (attention_mask == 0)).any()):
                raise ValueError("positions marks a padding token")
            if not bool(positions.any(dim=1).all()):
                raise ValueError("positions marks no token of some sample: every sample needs one")
        input_ids, attention_mask, positions = _to_right_padding(input_ids, attention_mask, positions)
        # drop all-pad trailing columns (batches padded to a fixed max_length cost only their longest sample)
        longest = int(attention_mask.sum(dim=1).max())
        if longest < attention_mask.shape[1]:
            input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
            positions = None if positions is None else positions[:, :longest]
        bsz, seqlen = input_ids.shape
        loss_idx = self.loss_token_index(attention_mask)

        if select in ("all", "answer"):
            mask = attention_mask.bool() if positions is None else positions
            lengths = mask.sum(dim=1)
            flat_index = mask.reshape(-1).nonzero().squeeze(1)
        else:
            lengths = torch.ones(bsz, dtype=torch.long, device=self.device)
            flat_index = torch.arange(bsz, device=self.device) * seqlen + loss_idx
        n_tokens = int(flat_index.numel())
        if sink is None:
            acts = torch.empty(n_tokens, len(self.layers), self.hidden_size, dtype=self.dtype, device=self.device)
            writer = None
        else:
            acts, writer = None, sink(n_tokens, len(self.layers), self.hidden_size)

        want_logits = label_token_ids is not None
        deepest = max(self.layers)
        slots: dict[int, int] = {layer: j for j, layer in enumerate(self.layers)}

        def make_hook(layer: int):
            j = slots[layer]

            def hook(_module, _args, output):
                hidden = _hidden_from_output(output)
                selected = hidden.reshape(bsz * seqlen, -1).index_select(0, flat_index)
                if writer is None:
                    acts[:, j] = selected
                else:
                    writer.write(j, selected)
                if layer == deepest and not want_logits:
                    raise _StopForward

            return hook

        kwargs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_decoder:
            kwargs["use_cache"] = False
        logits = None
        with self._lock:
            handles = [self.blocks[layer].register_forward_hook(make_hook(layer)) for layer in self.layers]
            try:
                if want_logits:
                    if self._accepts_logits_to_keep:  # only the B loss positions go through the LM head
                        out = self.model(**kwargs, logits_to_keep=loss_idx[:, None])
                    else:
                        out = self.model(**kwargs)
                    if out.logits.shape[1] == 1:
                        full = out.logits[:, 0]
                    else:
                        full = out.logits[torch.arange(bsz, device=self.device), loss_idx]
                    ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=full.device)
                    logits = full.index_select(-1, ids).float()
                    del out, full
                else:
                    try:
                        self.base_model(**kwargs)
                    except _StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
        return BackboneOutput(acts=acts, lengths=lengths.to(torch.long), logits=logits, sink=writer)


def _to_right_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Move every row's real tokens to the front, keeping their order (a no-op for right-padded batches);
    ``positions`` (a per-token mask, if given) moves with them.

    A mask with holes (``1 0 1``) is compacted the same way: the masked tokens are simply not part of the input.
    """
    if attention_mask.shape[1] < 2 or not bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        return input_ids, attention_mask, positions
    order = torch.argsort((attention_mask == 0).to(torch.uint8), dim=1, stable=True)
    moved = None if positions is None else positions.gather(1, order)
    return input_ids.gather(1, order), attention_mask.gather(1, order), moved


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def add_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]) -> nn.Module:
    """Freeze ``model`` and wrap it with PEFT LoRA adapters on ``target_modules`` (a clear error when
    none of them exists in the model)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"LoRA target_modules {list(target_modules)} do not match the backbone: {err}") from None


def packed_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only real tokens (``0..n-1`` per sample, 0 on pads), for any padding side."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def load_split_part(config: BackboneConfig, split_layer: int, part: str) -> nn.Module:
    """The bare decoder (``AutoModel``) cut at ``split_layer``: ``lower`` keeps the embeddings and blocks
    ``0..k-1`` (no final norm: its output is the hidden state after block ``k-1``), ``upper`` keeps blocks
    ``k..L-1`` and the final norm (it is fed ``inputs_embeds``; the embedding table is dropped)."""
    model, _ = load_hf_model(config, lm_head=False)
    if not is_decoder_config(model.config):
        raise ValueError(f"split learning needs a decoder backbone; {model.config.model_type} is an encoder")
    blocks = find_blocks(model)
    if not 1 <= split_layer < len(blocks):
        raise ValueError(f"split_layer must be in [1, {len(blocks) - 1}] for {len(blocks)} blocks, got {split_layer}")
    if not isinstance(getattr(model, "norm", None), nn.Module):
        raise ValueError(f"split learning needs a final .norm on the {type(model).__name__}")
    if part == "lower":
        del blocks[split_layer:]
        model.norm = nn.Identity()
    elif part == "upper":
        del blocks[:split_layer]
        model.embed_tokens = None
    else:
        raise ValueError(f"part must be 'lower' or 'upper', got {part!r}")
    model.train()
    return model
