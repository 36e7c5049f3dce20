"""Tensors in Flower records and back (needs the extra): ``ArrayRecord`` arrays are written with
``np.save(allow_pickle=False)`` and read with ``np.load(allow_pickle=False)`` by Flower; bfloat16 is refused by
Flower, so what travels is int8, float16 or float32."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

__all__ = ["tensors_of", "to_record"]


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors as an ``ArrayRecord`` (saved with ``np.save(allow_pickle=False)`` by Flower)."""
    return ArrayRecord(torch_state_dict={name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def tensors_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord`` as named tensors: each array is read with ``np.load(allow_pickle=False)`` (Flower's
    ``Array.numpy``); an object array cannot be read, and the schemas check dtypes and shapes after this."""
    out = {}
    for name, array in record.items():
        value = array.numpy()
        if value.dtype == object:  # never reached with allow_pickle=False; kept as a guard
            raise ValueError(f"array {name!r} has dtype object")
        out[name] = torch.from_numpy(np.array(value, copy=True))
    return out
