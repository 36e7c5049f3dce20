"""The FedAvg-LoRA baseline's device model (issue 10's baseline; issue 12's cross-check on Flower's ``FedAvg``).

:class:`LoraClassifier`: a backbone with PEFT LoRA (rank ``r`` on ``q_proj``/``v_proj``, alpha ``2r``, dropout
0.05) and a classification head at the loss token, trained for real (bf16 autocast over float32 weights, AdamW).
What travels (:meth:`LoraClassifier.state` / :meth:`LoraClassifier.load_state`) is the adapters and the head,
rounded to float16 both ways, as Fed MobiLLM's downloads are. ``benchmarks/federated.py`` runs it on the virtual
clock; :mod:`lightning_mobillm.flower.fedavg` runs it on Flower. FedAvg averages only within one architecture.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["LoraClassifier", "padded_batches"]


def padded_batches(ids: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int, pad_id: int,
                   order: Sequence[int] | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Right-padded ``(input_ids, attention_mask, labels)`` batches in ``order`` (default: as given)."""
    order = list(range(len(ids))) if order is None else list(order)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(idx), width), dtype=torch.int64)
        for row, i in enumerate(idx):
            x[row, :len(ids[i])] = torch.tensor(list(ids[i]), dtype=torch.int64)
            mask[row, :len(ids[i])] = 1
        yield x, mask, torch.tensor([int(labels[i]) for i in idx], dtype=torch.int64)


class LoraClassifier:
    """A FedAvg-LoRA device model: backbone ``source`` in float32 with LoRA, plus a loss-token head.

    Args:
        source: the backbone's alias or folder.
        num_classes: the head's outputs.
        r: LoRA rank (alpha ``2r``, dropout 0.05, on ``q_proj`` and ``v_proj``).
        seed: seeds the adapters' and the head's initial weights (``torch.manual_seed`` before loading).
    """

    def __init__(self, source: str, num_classes: int, *, r: int = 8, seed: int = 0) -> None:
        from lightning_mobillm.backbone import add_lora, load_hf_model, load_tokenizer
        from lightning_mobillm.side.heads import LastTokenHead
        from lightning_mobillm.specs import BackboneConfig

        config = BackboneConfig(source=source, dtype="float32")
        self.tokenizer = load_tokenizer(config)
        self.pad_id = int(self.tokenizer.pad_token_id)
        torch.manual_seed(seed)
        model, _ = load_hf_model(config, lm_head=False)
        self.model = add_lora(model, r, 2 * r, 0.05, ["q_proj", "v_proj"])
        self.head = LastTokenHead(int(model.config.hidden_size), num_classes, 0.1)
        self.params = {f"lora.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        self.params.update({f"head.{n}": p for n, p in self.head.named_parameters()})

    @property
    def nbytes(self) -> int:
        """Bytes of one transfer of the adapters and the head (float16)."""
        return sum(p.numel() * 2 for p in self.params.values())

    def state(self) -> dict[str, Tensor]:
        """The adapters and the head, rounded to float16 (returned as float32 copies)."""
        return {n: p.detach().half().float() for n, p in self.params.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Load adapters and head (strict: exactly :attr:`params`' names and shapes)."""
        if set(state) != set(self.params):
            missing, extra = sorted(set(self.params) - set(state))[:3], sorted(set(state) - set(self.params))[:3]
            raise ValueError(f"not this model's adapters and head: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for n, p in self.params.items():
                if tuple(state[n].shape) != tuple(p.shape):
                    raise ValueError(f"{n}: shape {tuple(state[n].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[n].to(p.dtype))

    def logits(self, x: Tensor, mask: Tensor) -> Tensor:
        from lightning_mobillm.backbone import loss_token_index

        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = self.model(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
        idx = loss_token_index(mask, True)
        return self.head(hidden[torch.arange(len(idx)), idx].float())

    def train_local(self, ids: Sequence[Sequence[int]], labels: Sequence[int], *, epochs: int, batch_size: int,
                    lr: float = 5e-4, order_seed: str = "") -> float:
        """``epochs`` passes over the samples (a fresh AdamW; the order of each epoch seeded by
        ``f"{order_seed}/{epoch}"``); returns the busy seconds."""
        self.model.train()
        self.head.train()
        opt = torch.optim.AdamW(list(self.params.values()), lr=lr)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            order = random.Random(f"{order_seed}/{epoch}").sample(range(len(ids)), len(ids))
            for x, mask, y in padded_batches(ids, labels, batch_size, self.pad_id, order):
                loss = torch.nn.functional.cross_entropy(self.logits(x, mask), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(self, ids: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int = 16) -> float:
        """Accuracy on the given samples."""
        self.model.eval()
        self.head.eval()
        correct = 0
        for x, mask, y in padded_batches(ids, labels, batch_size, self.pad_id):
            correct += int((self.logits(x, mask).argmax(-1) == y).sum())
        return correct / max(len(labels), 1)
