"""MobiLLM's side network: a ladder of parallel bottleneck adapters fed by the backbone's taps.

The device runs the frozen backbone forward only and ships the hidden state after every tapped block;
the server trains this network on those activations. It never touches the backbone, so the backward
pass (the "backpropagation bypass" of the paper) stays entirely on the server.

Input format (fixed by the rest of the system): *packed* activations ``acts`` of shape ``[N, L, d]``
-- the selected tokens of all ``B`` samples concatenated in sample order, ``L`` tapped layers in
backbone order, width ``d`` -- plus ``lengths`` ``[B]`` (tokens per sample, each >= 1, summing to
``N``). With the loss-token shortcut every length is 1. The network is token-wise: there is no
attention or any other mixing across tokens before pooling, which is what makes the shortcut exact.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_mobillm.side.heads import PooledLinearHead, PoolMode
from lightning_mobillm.side.network import SideNetwork

__all__ = ["BottleneckAdapter", "ParallelAdapterSideNetwork", "ParallelAdapterTrunk", "make_activation", "rms_normalize"]

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}

NormKind = Literal["layernorm", "rmsnorm"]


def make_activation(name: str) -> nn.Module:
    """Build an activation module by name (``gelu``, ``gelu_tanh``, ``relu``, ``silu``/``swish``, ``tanh``)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Divide ``x`` by its root-mean-square over the last dim (parameter-free): ``x / sqrt(mean(x^2) + eps)``."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class BottleneckAdapter(nn.Module):
    """Residual bottleneck adapter ``x + W_up act(W_down x)``.

    ``W_up`` (weight and bias) is zero-initialised, so a fresh adapter is exactly the identity and
    training starts from the plain gated fusion of the taps.

    Args:
        hidden_size: input/output width ``d``.
        reduction: bottleneck width is ``max(1, d // reduction)``.
        activation: nonlinearity between the projections (see :func:`make_activation`).
    """

    def __init__(self, hidden_size: int, reduction: int = 8, activation: str = "gelu") -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.hidden_size = int(hidden_size)
        self.bottleneck = max(1, self.hidden_size // int(reduction))
        self.down = nn.Linear(self.hidden_size, self.bottleneck)
        self.act = make_activation(activation)
        self.up = nn.Linear(self.bottleneck, self.hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


class ParallelAdapterTrunk(nn.Module):
    """The trunk of MobiLLM's side network: parallel adapters over packed, per-layer backbone taps.

    For tapped layers ``i = 1..L`` (backbone order), with ``A_i = acts[:, i-1, :]``::

        s_0 = 0
        s_i = Adapter_i((1 - mu_i) * A_i + mu_i * s_{i-1}),   mu_i = sigmoid(alpha_i)

    then ``final_norm(s_L)`` per token: ``[N, L, d] -> [N, d]``. A head (:mod:`lightning_mobillm.side.heads`)
    pools each sample's tokens and maps them to outputs.

    Design choices that are ours (the paper does not specify the side network); each is a knob:

    * **Gated residual ladder.** One scalar gate per tapped layer, ``alpha_i`` initialised to 0 so
      ``mu_i = 0.5``: the state is an exponentially weighted mix of all taps, with deeper layers
      weighted more at the start.
    * **Identity start.** ``Adapter(x) = x + W_up act(W_down x)`` with bottleneck ``d // reduction``
      (default ``reduction=8``) and ``W_up`` zero-initialised.
    * **RMS-normalised taps** (``normalize_taps=True``, default). Inner hidden states of decoder LLMs
      are not normalised (norms grow with depth in SmolLM2, with outlier channels), so each
      ``A_i`` is divided by its own per-token RMS (parameter-free, eps 1e-6) before the fusion.
      On VitaminC this beat unnormalised taps on every seed; without it the gates stayed near 0.5.
      It also makes the output invariant to a positive rescaling of a token's activations.
    * **Final norm** (``final_norm``: ``"layernorm"`` default, or ``"rmsnorm"``; both with weight).

    Args:
        num_taps: ``L``, the number of tapped layers.
        hidden_size: ``d``, the backbone width.
        reduction: adapter bottleneck reduction factor ``r``.
        normalize_taps: RMS-normalise each tap before fusing it.
        activation: adapter nonlinearity.
        final_norm: ``"layernorm"`` or ``"rmsnorm"``.
        eps: epsilon of the tap RMS normalisation.
    """

    def __init__(
        self,
        num_taps: int,
        hidden_size: int,
        reduction: int = 8,
        normalize_taps: bool = True,
        activation: str = "gelu",
        final_norm: NormKind = "layernorm",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_taps < 1:
            raise ValueError(f"num_taps must be >= 1, got {num_taps}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.num_taps = int(num_taps)
        self.hidden_size = int(hidden_size)
        self.out_features = self.hidden_size
        self.normalize_taps = bool(normalize_taps)
        self.eps = float(eps)
        self.adapters = nn.ModuleList(
            BottleneckAdapter(self.hidden_size, reduction, activation) for _ in range(self.num_taps)
        )
        # One scalar gate logit per tapped layer; mu_i = sigmoid(alpha_i) starts at 0.5.
        self.gate_alpha = nn.Parameter(torch.zeros(self.num_taps))
        if final_norm == "layernorm":
            self.final_norm = nn.LayerNorm(self.hidden_size)
        elif final_norm == "rmsnorm":
            self.final_norm = nn.RMSNorm(self.hidden_size, eps=1e-6)
        else:
            raise ValueError(f"final_norm must be 'layernorm' or 'rmsnorm', got {final_norm!r}")

    @property
    def gates(self) -> Tensor:
        """``mu_i = sigmoid(alpha_i)`` for every tapped layer, shape ``[L]``."""
        return torch.sigmoid(self.gate_alpha)

    def check_acts(self, acts: Tensor) -> None:
        if not isinstance(acts, Tensor):
            raise ValueError(f"acts must be a torch.Tensor, got {type(acts).__name__}")
        if acts.dim() != 3:
            raise ValueError(
                f"acts must have shape [N, L, d] (packed tokens, tapped layers, width), got shape {tuple(acts.shape)}"
            )
        n, num_layers, width = acts.shape
        if num_layers != self.num_taps or width != self.hidden_size:
            raise ValueError(
                f"acts has {num_layers} layers of width {width}, but the side network was built for "
                f"L={self.num_taps} tapped layers of width d={self.hidden_size} (shape {tuple(acts.shape)})"
            )
        if n < 1:
            raise ValueError("acts holds no tokens (N == 0)")
        if not acts.is_floating_point():
            raise ValueError(f"acts must be floating point, got dtype {acts.dtype}")

    def side_states(self, acts: Tensor) -> Tensor:
        """Final side state ``s_L`` of every packed token, ``[N, d]`` (before the final norm)."""
        self.check_acts(acts)
        gates = self.gates.to(acts.dtype)
        # every layer's normalisation and (1 - mu_i) weight in one pass: the ladder below is sequential, and with
        # few tokens (a decode step on the device) its cost is the number of ops, not their size
        taps = rms_normalize(acts, self.eps) if self.normalize_taps else acts
        taps = taps * (1 - gates)[:, None]
        state = acts.new_zeros(acts.shape[0], self.hidden_size)
        for i, adapter in enumerate(self.adapters):
            state = adapter(taps[:, i, :] + gates[i] * state)
        return state

    def forward(self, acts: Tensor) -> Tensor:
        """Packed taps ``[N, L, d]`` to normalised per-token side states ``[N, d]``."""
        return self.final_norm(self.side_states(acts))


class ParallelAdapterSideNetwork(SideNetwork):
    """MobiLLM's side network in one piece: a :class:`ParallelAdapterTrunk` and a
    :class:`~lightning_mobillm.side.heads.PooledLinearHead` (pooling per sample, dropout, linear), with
    the trunk's parts reachable by their names (``adapters``, ``gates``, ``final_norm``...).

    Args:
        num_taps, hidden_size, reduction, normalize_taps, activation, final_norm, eps: the trunk's.
        num_outputs: size of the head's output (number of classes).
        dropout: dropout before the head's linear map.
        pool: ``"last"`` (the sample's last token in packed order, a decoder's loss token), ``"mean"``,
            or ``"first"`` (an encoder's [CLS] when whole sequences are sent). With one token per
            sample all modes agree.
    """

    def __init__(
        self,
        num_taps: int,
        hidden_size: int,
        num_outputs: int,
        reduction: int = 8,
        normalize_taps: bool = True,
        activation: str = "gelu",
        dropout: float = 0.0,
        pool: PoolMode = "last",
        final_norm: NormKind = "layernorm",
        eps: float = 1e-6,
    ) -> None:
        trunk = ParallelAdapterTrunk(num_taps, hidden_size, reduction=reduction, normalize_taps=normalize_taps,
                                     activation=activation, final_norm=final_norm, eps=eps)
        super().__init__(trunk, PooledLinearHead(trunk.out_features, num_outputs, pool=pool, dropout=dropout))

    @property
    def adapters(self) -> nn.ModuleList:
        return self.trunk.adapters

    @property
    def gate_alpha(self) -> nn.Parameter:
        return self.trunk.gate_alpha

    @property
    def gates(self) -> Tensor:
        return self.trunk.gates

    @property
    def final_norm(self) -> nn.Module:
        return self.trunk.final_norm

    def side_states(self, acts: Tensor) -> Tensor:
        return self.trunk.side_states(acts)

    def pool_tokens(self, states: Tensor, lengths: Tensor) -> Tensor:
        return self.head.pool_tokens(states, lengths)
