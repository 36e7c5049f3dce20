"""``SideConfig``: what a side network is, as plain data, in PEFT's manner.

A side network is a trunk over the backbone's taps and a head (:class:`~lightning_mobillm.side.network.
SideNetwork`). The config names both by type (looked up in :data:`TRUNK_TYPES` and :data:`HEAD_TYPES`,
never an import path) with their knobs; ``to_dict``/``from_dict`` make it a hello field, a YAML section
and a checkpoint entry alike. A new trunk or head registers its class under a new type name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lightning_mobillm.side.heads import PooledLinearHead
from lightning_mobillm.side.network import SideNetwork
from lightning_mobillm.side.parallel_adapters import ParallelAdapterTrunk
from lightning_mobillm.specs import TapSpec

__all__ = ["HEAD_TYPES", "KNOBS", "TRUNK_TYPES", "SideConfig"]

#: trunk type name -> class built as ``cls(num_taps, hidden_size, **trunk knobs)``
TRUNK_TYPES: dict[str, type] = {"parallel_adapters": ParallelAdapterTrunk}
#: head type name -> class built as ``cls(in_features, num_outputs, **head knobs)``
HEAD_TYPES: dict[str, type] = {"pooled_linear": PooledLinearHead}

_TRUNK_KNOBS = ("reduction", "normalize_taps", "activation", "final_norm")
_HEAD_KNOBS = ("pool", "dropout")
#: the knobs of a side config, named as the side-tuning module's constructor names them
KNOBS = (*_TRUNK_KNOBS, *_HEAD_KNOBS)


@dataclass
class SideConfig:
    """The side network's type and shape (not its training: the optimiser lives with the module).

    Args:
        trunk: a key of :data:`TRUNK_TYPES`.
        head: a key of :data:`HEAD_TYPES`.
        reduction, normalize_taps, activation, final_norm: the parallel-adapter trunk's knobs.
        pool, dropout: the pooled head's knobs.
    """

    trunk: str = "parallel_adapters"
    head: str = "pooled_linear"
    reduction: int = 8
    normalize_taps: bool = True
    activation: str = "gelu"
    final_norm: str = "layernorm"
    pool: str = "last"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.trunk not in TRUNK_TYPES:
            raise ValueError(f"unknown side trunk {self.trunk!r}; known: {sorted(TRUNK_TYPES)}")
        if self.head not in HEAD_TYPES:
            raise ValueError(f"unknown side head {self.head!r}; known: {sorted(HEAD_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SideConfig:
        """Inverse of :meth:`to_dict`; an unknown key is refused by name (a config is data from elsewhere)."""
        if not isinstance(d, dict):
            raise ValueError(f"a side config is an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown side config keys {unknown}; known: {sorted(known)}")
        for f in dataclasses.fields(cls):  # each value of its default's type (a config crosses the network)
            if f.name not in d:
                continue
            value, default = d[f.name], f.default
            ok = (isinstance(value, bool) if isinstance(default, bool)
                  else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
                  else isinstance(value, str) if isinstance(default, str) else True)
            if not ok:
                raise ValueError(f"side config {f.name} must be a {type(default).__name__}, got {value!r}")
        if not 1 <= d.get("reduction", 1) <= 4096 or not 0 <= d.get("dropout", 0.0) < 1:
            raise ValueError("side config: reduction must be in [1, 4096] and dropout in [0, 1)")
        return cls(**d)

    def module_kwargs(self) -> dict[str, Any]:
        """The knobs as the side-tuning module's constructor takes them."""
        return {k: getattr(self, k) for k in KNOBS}

    def build(self, tap_spec: TapSpec, num_outputs: int, *, seed: int | None = None) -> SideNetwork:
        """The side network for a backbone's taps (seeded: the same seed builds the same weights)."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            trunk = TRUNK_TYPES[self.trunk](tap_spec.num_taps, tap_spec.hidden_size,
                                            **{k: getattr(self, k) for k in _TRUNK_KNOBS})
            head = HEAD_TYPES[self.head](trunk.out_features, num_outputs, **{k: getattr(self, k) for k in _HEAD_KNOBS})
        return SideNetwork(trunk, head)
