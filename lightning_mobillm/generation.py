"""Generation on the device with a trained side network, through the stock ``model.generate()``.

While :class:`SideGeneration` is active, forward hooks on the tapped blocks keep each forward's taps and a
forward pre-hook on the backbone's final norm replaces its input, the last block's hidden state, with
``last_tap + W_o(trunk(taps))``: the same computation the server trains
(:mod:`lightning_mobillm.side.causal_lm`), applied to every position the forward sees. The side network is
token-wise, so decoding with the KV cache (one new position per step) needs nothing else: greedy decoding,
sampling, beam search and streamers all work unchanged, and a side network whose ``W_o`` is zero gives exactly
the backbone's own output.

The side network is not a weight delta: it cannot be merged into the backbone's checkpoint (there is no
``merge_and_unload``); ship its weights beside the backbone and wrap ``generate`` in :class:`SideGeneration`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mobillm.backbone import _hidden_from_output, find_blocks
from lightning_mobillm.side.causal_lm import ResidualLMHead

__all__ = ["SideGeneration", "contiguous_head_input", "generate_texts"]


class SideGeneration:
    """Hooks that make a Hugging Face causal LM generate with a side network (a context manager).

    Args:
        model: the backbone (a ``*ForCausalLM``), frozen.
        layers: the tapped block indices, in the order the trunk was trained on; the last block must be one
            of them (its output is the residual's base).
        trunk: the side trunk, ``[N, L, d] -> [N, d_side]``.
        head: the trained :class:`~lightning_mobillm.side.causal_lm.ResidualLMHead`.
        last_only: correct each row's last position only. ``generate`` reads the logits of the last position
            alone (the side network changes no block's input, so the KV cache does not depend on it): exact for
            generation, and a long prompt's taps are never stacked (``[B, L, d]`` instead of ``[B, T, L, d]``).
            Leave it off to get every position's corrected logits (teacher forcing).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], trunk: nn.Module, head: ResidualLMHead,
                 last_only: bool = False) -> None:
        base = getattr(model, "base_model", model)
        self.blocks = find_blocks(base)
        self.norm = getattr(base, "norm", None)
        if not isinstance(self.norm, nn.Module):
            raise ValueError(f"{type(model).__name__} has no final norm (`base_model.norm`) to hook")
        self.layers = [int(i) % len(self.blocks) for i in layers]
        if len(self.blocks) - 1 not in self.layers:
            raise ValueError(f"the last block ({len(self.blocks) - 1}) must be tapped: it is the residual's base; "
                             f"tapped: {list(layers)}")
        self.trunk, self.head, self.last_only = trunk, head, last_only
        self._taps: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    def _keep(self, j: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = _hidden_from_output(output)
            # contiguous: a view of the last position would keep the whole prompt's hidden state alive
            self._taps[j] = hidden[:, -1:].contiguous() if self.last_only else hidden

        return hook

    def _correct(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if len(self._taps) != len(self.layers):
            raise RuntimeError(f"the final norm ran after {len(self._taps)} of {len(self.layers)} tapped blocks")
        full = args[0]
        x = full[:, -1:] if self.last_only else full
        bsz, seqlen, width = x.shape
        param = next(self.trunk.parameters())
        acts = torch.stack([self._taps[j] for j in range(len(self.layers))], dim=2)
        acts = acts.reshape(bsz * seqlen, len(self.layers), width).to(device=param.device, dtype=param.dtype)
        hidden = self.head(self.trunk(acts), x.reshape(bsz * seqlen, width).to(param.device))
        self._taps.clear()
        hidden = hidden.reshape(bsz, seqlen, width).to(device=full.device, dtype=full.dtype)
        if self.last_only and full.shape[1] > 1:
            hidden = torch.cat([full[:, :-1], hidden], dim=1)
        return (hidden, *args[1:])

    def __enter__(self) -> SideGeneration:
        if self._handles:
            raise RuntimeError("SideGeneration is already active")
        self._handles = [self.blocks[layer].register_forward_hook(self._keep(j)) for j, layer in enumerate(self.layers)]
        self._handles.append(self.norm.register_forward_pre_hook(self._correct))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._taps = [], {}


def generate_texts(model: Any, tokenizer: Any, batches: Iterable[dict[str, Tensor]], side: Any = None,
                   layers: Sequence[int] | None = None, max_new_tokens: int = 32,
                   stop_token_ids: Sequence[int] | None = None, **generate_kwargs: Any) -> list[tuple[int, str]]:
    """``(index, text)`` of the tokens ``model.generate`` writes after each left-padded prompt of ``batches``
    (greedy unless ``generate_kwargs`` say otherwise), with ``side`` (a trunk and a ``ResidualLMHead``, tapping
    ``layers``) when given, else the backbone alone. Generation stops at any of ``stop_token_ids`` (e.g. the data
    module's end of turn), the model's ``generation_config.eos_token_id`` and the tokenizer's EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = _stop_ids(model, tokenizer, stop_token_ids)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad, "eos_token_id": stops,
              **generate_kwargs}
    hooks = SideGeneration(model, list(layers or []), side.trunk, side.head, last_only=True) if side is not None \
        else nullcontext()
    out: list[tuple[int, str]] = []
    with torch.inference_mode(), hooks, contiguous_head_input(model):
        for batch in batches:
            ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
            new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out += [(int(i), text.strip()) for i, text in zip(batch["index"], texts)]
    return out


@contextmanager
def contiguous_head_input(model: Any):
    """While active, the LM head's input is made contiguous before the head runs.

    ``generate`` hands the head the last position as a strided view of the prompt's ``[B, T, d]`` hidden state
    (``logits_to_keep=1``). PyTorch 2.13's CPU ``linear`` in bf16 takes a slow path on that view: with
    SmolLM2-135M's 49152 x 576 head, a 16 x 250 prompt batch cost 0.87 GB of transient memory and 0.66 s per
    prefill, against 3 MB and 5 ms for the same rows copied contiguous (fp32: 62 ms against 15 ms). The copy is
    ``[B, 1, d]``; the logits are the same.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    handle = head.register_forward_pre_hook(_contiguous_first) if isinstance(head, nn.Module) else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _contiguous_first(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _stop_ids(model: Any, tokenizer: Any, extra: Sequence[int] | None) -> list[int]:
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config = [config] if isinstance(config, int) else list(config or [])
    ids = [*(extra or []), *config, tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))
