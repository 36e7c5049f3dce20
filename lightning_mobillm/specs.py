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
        return cls(
            layers=[int(i) for i in d["layers"]],
            hidden_size=int(d["hidden_size"]),
            arch=str(d.get("arch", "")),
            is_decoder=bool(d.get("is_decoder", True)),
        )
