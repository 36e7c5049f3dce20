"""Small shared data types: what the device's backbone exposes and how activations travel.

These are plain dataclasses so that they can be written to YAML configs, JSON frame headers and
checkpoints without pickling anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class BackboneConfig:
    """Which frozen backbone the device runs, and which of its blocks are tapped.

    Args:
        source: a packaged offline alias (``smollm2-135m``, ``qwen2.5-coder-0.5b``,
            ``qwen2.5-coder-1.5b``, ``minilm-l6``; see :mod:`lightning_mobillm.assets`), a Hugging Face
            hub id, or a local folder holding a ``config.json``.
        gguf_file: file name of a GGUF checkpoint inside ``source`` (a folder); converted once into the
            cache folder.
        dtype: the dtype the backbone computes in on the device.
        layers: the 0-based indices of the blocks whose output hidden states are tapped, or ``"all"``.
        revision: hub revision, for hub ids.
        trust_remote_code: passed to ``from_pretrained``; keep ``False`` unless you trust the source.
    """

    source: str = "smollm2-135m"
    gguf_file: str | None = None
    dtype: Dtype = "float32"
    layers: list[int] | Literal["all"] = "all"
    revision: str | None = None
    trust_remote_code: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TapSpec:
    """What the side network needs to know about the backbone's taps (sent to the server in the hello).

    Attributes:
        layers: 0-based block indices that are tapped, in order.
        hidden_size: width ``d`` of every tapped hidden state.
        arch: the backbone's ``model_type`` (``llama``, ``gemma3_text``, ``qwen2``, ``bert``...).
        is_decoder: decoders classify from the last non-pad token, encoders from the first ([CLS]).
    """

    layers: list[int] = field(default_factory=list)
    hidden_size: int = 0
    arch: str = ""
    is_decoder: bool = True

    @property
    def num_taps(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TapSpec:
        """The inverse of :meth:`to_dict`, strict (it reads hellos): exactly its keys, no coerced types."""
        keys = {"layers", "hidden_size", "arch", "is_decoder"}
        if set(d) != keys:
            raise ValueError(f"keys must be {sorted(keys)}, got {sorted(d)}")
        layers, hidden = d["layers"], d["hidden_size"]
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError("layers must be a list of ints")
        if not isinstance(hidden, int) or isinstance(hidden, bool):
            raise ValueError("hidden_size must be an int")
        if not isinstance(d["arch"], str) or not isinstance(d["is_decoder"], bool):
            raise ValueError("arch must be a string and is_decoder a boolean")
        return cls(layers=list(layers), hidden_size=hidden, arch=d["arch"], is_decoder=d["is_decoder"])
