"""What a Fed MobiLLM device hands the server, once: the contract between the device worker and the
shared-model server policy (and, later, our link's frames and Flower's ``ArrayRecord``).

An :class:`Upload` holds a device's whole shard (or one chunk of it), forwarded once through its frozen
backbone: for every sample, the hidden state of each of the federation's K aligned layers at the loss token
(the shortcut: one vector per aligned layer), quantised with a codec of :mod:`lightning_mobillm.transport.codecs`
as the ``acts.*`` parts of :func:`lightning_mobillm.protocol.pack_acts` (with ``lengths`` all ones), and the
device-defined targets ``T_d(onehot(y) - softmax(z_b))`` of :mod:`lightning_mobillm.privacy`. No label, token
id or text: there is no field for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Upload"]


@dataclass
class Upload:
    """One device's upload.

    Attributes:
        device: the device's id (the server's per-device statistics, quotas and target heads use it).
        backbone_type: :attr:`lightning_mobillm.fed.alignment.BackboneType.key` of the device's backbone
            (``<name>/<arch>/d<width>-L<depth>``): which width projection the shared model applies.
        keys: one opaque sample key per sample (``[A-Za-z0-9_-]{1,128}``; a keyed hash, never the text).
        acts: the codec's parts (``acts.q``, ``acts.scale``, ...; no ``lengths``): ``[N, K, d_b]`` decoded.
        codec: the codec's name (``int8`` by default; ``fp32`` for exactness checks).
        targets: ``[N, out_dim]`` float32 targets in the device's target space (its transform's output).
        target_space: who can read the targets: ``"device"`` (the device's own key: a head of its own on the
            server), ``"federation"`` (a key all devices share, never the server: one shared head), or
            ``"plain"`` (no transform, the paper's residual: one shared head).
        arrival_s: when it reached the server on the virtual clock (0 when not simulated).
        device_compute_s: the device's measured busy seconds for this upload (forward, targets, quantising).
    """

    device: str
    backbone_type: str
    keys: list[str]
    acts: dict[str, Tensor]
    codec: str
    targets: Tensor
    target_space: str = "device"
    arrival_s: float = 0.0
    device_compute_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors it carries (activations and targets), what the uplink is charged for."""
        return sum(t.numel() * t.element_size() for t in (*self.acts.values(), self.targets))

    def decoded(self) -> Tensor:
        """The activations as float32 ``[N, K, d_b]``."""
        from lightning_mobillm.protocol import unpack_acts

        n = len(self.keys)
        acts, _ = unpack_acts({**self.acts, "lengths": torch.ones(n, dtype=torch.int64)}, self.codec)
        return acts
