"""Layer and width alignment: how backbones of different depths and widths feed one shared side network.

Fed MobiLLM (``../shared/METHODS.md`` section 3) lets devices with different frozen backbones train one side
network. Two alignments make their uploads comparable:

* **Layers.** ``K`` is the depth of the shallowest backbone in the federation (or a configured ``K`` no
  deeper than any of them). A backbone of depth ``D`` is cut into ``K`` near-equal blocks of consecutive
  layers and taps the last layer of each: layer ``ceil(k * D / K) - 1`` for ``k = 1..K`` (0-based). Every
  backbone then uploads ``K`` taps, its last layer included, and tap ``k`` sits at the same relative depth
  in every backbone. :func:`aligned_layers`, :func:`federation_k`, :func:`aligned_tap_spec`.
* **Width.** One trainable linear projection per *backbone type* (not per device: every device running the
  same backbone shares it and trains it with its data) maps width ``d_b`` to the shared width ``d*``
  (default: the lower median of the types' widths). :class:`WidthAlignment`, :func:`shared_width`.

A backbone type is named by :class:`BackboneType`'s key, ``<name>/<arch>/d<width>-L<depth>`` (e.g.
``smollm2-135m/llama/d576-L30``); the server's allow-list of backbone types uses it. Why that key: see
:class:`BackboneType`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lightning_mobillm.assets import is_packaged
from lightning_mobillm.backbone import FrozenBackbone, is_decoder_config, resolve_backbone
from lightning_mobillm.specs import BackboneConfig, TapSpec

__all__ = [
    "AlignmentError",
    "BackboneType",
    "WidthAlignment",
    "aligned_backbone_config",
    "aligned_layers",
    "aligned_tap_spec",
    "backbone_shape",
    "federation_k",
    "shared_width",
]


class AlignmentError(ValueError):
    """A backbone or an upload that does not fit the federation's alignment (too shallow, wrong width or
    tap count, an unknown backbone type). A ``ValueError``, like :class:`~lightning_mobillm.transport.frames.
    FrameError`, so that a server refusing an upload can treat both alike."""


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AlignmentError(f"{what} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- layers
def aligned_layers(depth: int, k: int, name: str | None = None) -> list[int]:
    """The 0-based layers a backbone of ``depth`` layers taps in a federation of ``k`` aligned taps.

    Layer ``ceil(j * depth / k) - 1`` for ``j = 1..k``, in integer arithmetic: strictly increasing, the last
    is always ``depth - 1``, consecutive taps are ``floor(depth / k)`` or ``ceil(depth / k)`` layers apart,
    and ``depth == k`` taps every layer. ``name`` (the backbone's) goes into the error for a backbone
    shallower than ``k``.
    """
    depth = _positive_int(depth, "depth")
    k = _positive_int(k, "K")
    if depth < k:
        who = f"backbone {name!r}" if name is not None else "a backbone"
        raise AlignmentError(
            f"{who} has {depth} layers, fewer than the federation's K = {k} aligned taps: it cannot join "
            f"(K is at most the depth of the shallowest backbone)"
        )
    return [(j * depth + k - 1) // k - 1 for j in range(1, k + 1)]


def federation_k(depths: Mapping[str, int] | Sequence[int], k: int | None = None) -> int:
    """``K`` for a federation: the depth of its shallowest backbone, or the given ``k`` checked against it.

    ``depths`` maps backbone names (e.g. :attr:`BackboneType.key`) to their depths, so that a backbone
    shallower than a configured ``k`` is refused by name; a plain sequence of depths works too (named by
    position).
    """
    named = dict(depths) if isinstance(depths, Mapping) else {f"#{i}": d for i, d in enumerate(depths)}
    if not named:
        raise AlignmentError("a federation needs at least one backbone to fix K")
    for name, depth in named.items():
        _positive_int(depth, f"the depth of backbone {name!r}")
    if k is None:
        return min(named.values())
    k = _positive_int(k, "K")
    for name, depth in named.items():
        aligned_layers(depth, k, name=name)  # raises for a backbone shallower than k
    return k


# ---------------------------------------------------------------------------------------------- shapes
def backbone_shape(source: object) -> tuple[str, int, int, bool]:
    """``(arch, hidden_size, depth, is_decoder)`` of a backbone, read the way :class:`FrozenBackbone` reads it.

    ``source`` is a loaded :class:`FrozenBackbone`, a :class:`BackboneConfig` (only its Hugging Face config
    is read: no weights; a packaged GGUF alias is converted once first, as loading the backbone would) or a
    Hugging Face ``PretrainedConfig``. The depth of a config is its text config's ``num_hidden_layers``
    (``n_layer``, ``num_layers``), which is the length of the block list the backbone taps.
    """
    if isinstance(source, FrozenBackbone):
        spec = source.tap_spec
        return spec.arch, spec.hidden_size, source.num_blocks, spec.is_decoder
    config = _hf_config(source) if isinstance(source, BackboneConfig) else source
    if not hasattr(config, "model_type"):
        raise TypeError(
            f"expected a FrozenBackbone, a BackboneConfig or a Hugging Face config, got {type(source).__name__}"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depths = (getattr(text, attr, None) for attr in ("num_hidden_layers", "n_layer", "num_layers"))
    depth = next((n for n in depths if isinstance(n, int)), None)
    width = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
    if depth is None or not isinstance(width, int):
        raise AlignmentError(f"cannot read the depth and width of a {config.model_type!r} config")
    return str(config.model_type), width, depth, is_decoder_config(config)


def _hf_config(config: BackboneConfig):
    """The Hugging Face config a :class:`BackboneConfig` names (``config.json`` only, as ``load_hf_model``
    finds it)."""
    from transformers import AutoConfig

    path = resolve_backbone(config)
    kwargs: dict = {"trust_remote_code": config.trust_remote_code}
    if config.revision is not None and path == config.source:
        kwargs["revision"] = config.revision
    return AutoConfig.from_pretrained(path, **kwargs)


def aligned_tap_spec(source: object, k: int, name: str | None = None) -> TapSpec:
    """The :class:`TapSpec` a backbone sends in a federation of ``k`` aligned taps (see :func:`backbone_shape`
    for ``source``; a loaded backbone's own ``layers`` are ignored). Raises :class:`AlignmentError` for a
    backbone shallower than ``k``."""
    arch, width, depth, is_decoder = backbone_shape(source)
    if name is None and isinstance(source, (BackboneConfig, FrozenBackbone)):
        name = _source_name(source.config.source if isinstance(source, FrozenBackbone) else source.source)
    return TapSpec(layers=aligned_layers(depth, k, name=name or arch), hidden_size=width, arch=arch,
                   is_decoder=is_decoder)


def aligned_backbone_config(config: BackboneConfig, k: int) -> BackboneConfig:
    """A copy of ``config`` that taps the aligned layers: a :class:`FrozenBackbone` built from it has
    ``tap_spec == aligned_tap_spec(config, k)`` and fills ``[N, K, d]`` buffers, not ``[N, D, d]``."""
    return replace(config, layers=aligned_tap_spec(config, k).layers)


# ---------------------------------------------------------------------------------------------- types
_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]*")
_KEY = re.compile(r"(?P<name>[^/]+)/(?P<arch>[^/]+)/d(?P<width>[1-9][0-9]*)-L(?P<depth>[1-9][0-9]*)")


def _source_name(source: str) -> str:
    """A backbone's name as :meth:`FrozenBackbone.identity` gives it: the alias, or the last part of a hub
    id or folder (never a local path)."""
    return source if is_packaged(source) else Path(source).name


@dataclass(frozen=True)
class BackboneType:
    """A kind of backbone in a federation: one width projection and one set of per-type statistics each.

    The key, ``<name>/<arch>/d<hidden_size>-L<num_layers>`` (``qwen2.5-0.5b/qwen2/d896-L24``), is what the
    server's allow-list names and what :class:`WidthAlignment` is keyed by. Why these parts:

    * ``name`` (the packaged alias, or the last part of a hub id or folder, lower-cased; what
      :meth:`FrozenBackbone.identity` reports) tells apart checkpoints of the same shape whose activation
      spaces differ: Qwen2.5-0.5B and Qwen2.5-Coder-0.5B are both ``qwen2`` 896 x 24, and a base model and
      its instruct tune share a shape too. A shape-only key would make them share one projection.
    * ``arch``, width and depth make a key checkable against every upload and bind the projection's shape
      to it: a name reused for another shape is another type, never a shape error inside a running
      projection, and an allow-list entry says which tensors it admits.
    * not the dtype: the same weights run in bfloat16 or float32 give the same activations up to rounding
      and should train one projection;
    * not the weights' digest (``identity()['digest']``): it changes with the dtype, and an allow-list is
      written by a person. A server that wants to pin the weights can check the digest beside the key.

    Names are lower-cased; they must match ``[a-z0-9][a-z0-9._+-]*`` (hub repository names do). Two devices
    that save the same model under different folder names are two types: use an alias or a hub id.
    """

    name: str
    arch: str
    hidden_size: int
    num_layers: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise AlignmentError(f"a backbone type's name must match {_NAME.pattern!r}, got {self.name!r}")
        if not isinstance(self.arch, str) or not _NAME.fullmatch(self.arch.replace("_", "-")):
            raise AlignmentError(f"a backbone type's arch must be a model_type like 'llama', got {self.arch!r}")
        _positive_int(self.hidden_size, "hidden_size")
        _positive_int(self.num_layers, "num_layers")

    @property
    def key(self) -> str:
        return f"{self.name}/{self.arch}/d{self.hidden_size}-L{self.num_layers}"

    def __str__(self) -> str:
        return self.key

    @classmethod
    def from_key(cls, key: str) -> BackboneType:
        """Parse a key (an allow-list entry), strictly: ``from_key(t.key) == t``."""
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise AlignmentError(f"a backbone type key looks like 'smollm2-135m/llama/d576-L30', got {key!r}")
        return cls(match["name"], match["arch"], int(match["width"]), int(match["depth"]))

    @classmethod
    def from_identity(cls, identity: Mapping) -> BackboneType:
        """The type of a backbone from :meth:`FrozenBackbone.identity` (what a device's hello carries)."""
        try:
            name, arch = identity["name"], identity["arch"]
            width, depth = identity["hidden_size"], identity["num_layers"]
        except (KeyError, TypeError):
            raise AlignmentError("a backbone identity needs name, arch, hidden_size and num_layers") from None
        return cls(str(name).lower(), arch, width, depth)

    @classmethod
    def of(cls, source: object, name: str | None = None) -> BackboneType:
        """The type of a :class:`FrozenBackbone`, a :class:`BackboneConfig` (no weights loaded) or a Hugging
        Face config (which needs ``name``, since a config does not say which checkpoint it belongs to)."""
        arch, width, depth, _ = backbone_shape(source)
        if name is None:
            if isinstance(source, FrozenBackbone):
                name = _source_name(source.config.source)
            elif isinstance(source, BackboneConfig):
                name = _source_name(source.source)
            else:
                raise AlignmentError("a Hugging Face config does not name its checkpoint: pass name=")
        return cls(name.lower(), arch, width, depth)


# ---------------------------------------------------------------------------------------------- width
def shared_width(widths: Sequence[int], d_star: int | None = None) -> int:
    """The shared side width ``d*``: ``d_star`` if given, else the lower median of ``widths`` (one entry per
    backbone type).

    The lower median for an even count because it is always one of the federation's widths (so at least
    one type's projection starts as the identity) and gives the smaller, cheaper side network of the two.
    """
    if d_star is not None:
        return _positive_int(d_star, "the shared width d*")
    values = sorted(_positive_int(w, "a backbone width") for w in widths)
    if not values:
        raise AlignmentError("the shared width needs at least one backbone width (or an explicit d*)")
    return values[(len(values) - 1) // 2]


def _module_name(key: str) -> str:
    """A backbone type key as an ``nn.ModuleDict`` name (which may not contain ``.``): ``%`` and ``.``
    percent-escaped, so distinct keys stay distinct."""
    return key.replace("%", "%25").replace(".", "%2E")


class WidthAlignment(nn.Module):
    """One trainable projection per backbone type, from its width ``d_b`` to the shared width ``d*``.

    ``forward(acts, backbone_type)`` maps one type's aligned taps ``[N, K, d_b]`` to ``[N, K, d*]``; the
    same ``nn.Linear(d_b, d*)`` (with a bias) serves all ``K`` taps, so a type costs ``d_b * d* + d*``
    parameters, not ``K`` times that. Every device of a type trains the same projection.

    Initialisation: the identity when ``d_b == d*``; otherwise a random semi-orthogonal matrix, scaled so
    that it keeps an activation's norm (exactly when widening, in expectation when narrowing), so that types
    of different widths enter the side network at comparable scales. Its seed comes from the type's key, so
    a type's initial projection does not depend on the global RNG or on the order in which types joined.
    Biases start at zero.

    Args:
        types: the backbone types known at the start (key, e.g. :attr:`BackboneType.key`, to width ``d_b``).
        k: the federation's number of aligned taps (:func:`federation_k`).
        d_star: the shared width ``d*``; by default :func:`shared_width` of ``types``' widths (then
            ``types`` must not be empty).
    """

    def __init__(self, types: Mapping[str, int], k: int, d_star: int | None = None):
        super().__init__()
        self.k = _positive_int(k, "K")
        self.shared_width = shared_width(list(types.values()), d_star)
        self.projections = nn.ModuleDict()
        self._widths: dict[str, int] = {}
        # follows .to(): new projections are made on the module's device and in its dtype
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        for name, width in types.items():
            self.add_type(name, width)

    @property
    def types(self) -> dict[str, int]:
        """The known backbone types and their widths, in the order they joined (to rebuild the module before
        ``load_state_dict``)."""
        return dict(self._widths)

    def __contains__(self, name: object) -> bool:
        return name in self._widths

    def projection(self, name: str) -> nn.Linear:
        """The projection of backbone type ``name``."""
        self._check_known(name)
        return self.projections[_module_name(name)]  # type: ignore[return-value]

    def add_type(self, name: str, width: int) -> nn.Linear:
        """Admit a backbone type (at the start, or into a running federation) and return its projection.

        Admitting a known type again with the same width returns its projection unchanged (nothing is
        re-initialised); with another width it is refused. A key that parses as a :class:`BackboneType` must
        name the same width. A running optimizer does not see the new parameters by itself: add them, e.g.
        ``optimizer.add_param_group({"params": alignment.add_type(key, d).parameters()})``.
        """
        if not isinstance(name, str) or not name:
            raise AlignmentError(f"a backbone type's name must be a non-empty string, got {name!r}")
        width = _positive_int(width, f"the width of backbone type {name!r}")
        if name in self._widths:
            if self._widths[name] != width:
                raise AlignmentError(
                    f"backbone type {name!r} is known with width {self._widths[name]}, not {width}"
                )
            return self.projection(name)
        if _KEY.fullmatch(name) and BackboneType.from_key(name).hidden_size != width:
            raise AlignmentError(f"backbone type {name!r} names width {BackboneType.from_key(name).hidden_size}, "
                                 f"not {width}")
        layer = nn.Linear(width, self.shared_width, device=self._anchor.device, dtype=self._dtype())
        _init_projection(layer, name)
        self.projections[_module_name(name)] = layer
        self._widths[name] = width
        return layer

    def forward(self, acts: torch.Tensor, backbone_type: str) -> torch.Tensor:
        """``[N, K, d_b]`` aligned taps of one backbone type -> ``[N, K, d*]`` (in the projection's dtype)."""
        self._check_known(backbone_type)
        width = self._widths[backbone_type]
        if (not isinstance(acts, torch.Tensor) or not acts.is_floating_point() or acts.ndim != 3
                or acts.shape[1] != self.k or acts.shape[2] != width):
            got = f"{list(acts.shape)} {acts.dtype}" if isinstance(acts, torch.Tensor) else type(acts).__name__
            raise AlignmentError(
                f"backbone type {backbone_type!r} expects floating activations [N, {self.k}, {width}] "
                f"(K = {self.k} aligned taps of width {width}), got {got}"
            )
        layer = self.projections[_module_name(backbone_type)]
        return layer(acts.to(layer.weight.dtype))

    def extra_repr(self) -> str:
        return f"k={self.k}, shared_width={self.shared_width}, types={self._widths}"

    def _check_known(self, name: object) -> None:
        if name not in self._widths:
            raise AlignmentError(
                f"unknown backbone type {name!r}; known: {sorted(self._widths)} "
                f"(a new type joins with add_type, if the server's allow-list admits it)"
            )

    def _dtype(self) -> torch.dtype:
        dtype = self._anchor.dtype
        return dtype if dtype.is_floating_point else torch.float32


@torch.no_grad()
def _init_projection(layer: nn.Linear, key: str) -> None:
    """Identity for a square projection, else norm-keeping semi-orthogonal, seeded by the type's key."""
    d_out, d_in = layer.weight.shape
    if d_out == d_in:
        weight = torch.eye(d_out)
    else:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        weight = torch.empty(d_out, d_in)
        nn.init.orthogonal_(weight, gain=math.sqrt(max(1.0, d_in / d_out)),
                            generator=torch.Generator().manual_seed(seed))
    layer.weight.copy_(weight)
    layer.bias.zero_()
