"""``ServerConfig``: the settings of a server process, shared by ``serve``, the embedded server a device
starts, and the in-process link. A plain dataclass, so it is a YAML section and a JSON object alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class ServerConfig:
    """Settings of a side-network server.

    Args:
        host: interface to listen on (``0.0.0.0`` to accept remote devices).
        port: port to listen on; 0 picks a free one.
        token: shared secret devices must present; if None, read from the ``token_env`` variable; if that
            is unset too, the server accepts any device (loopback use only).
        token_env: environment variable holding the token.
        device: where the side network trains: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``.
        precision: ``32`` or ``bf16-mixed`` (autocast) for the side network's steps.
        grad_clip: max global gradient norm per step (None disables clipping).
        max_frame_mb: frames larger than this are refused.
        max_sessions: how many device sessions may be open at once.
        max_workers: gRPC worker threads.
        threads: torch intra-op threads for the server process (None keeps torch's default).
        workdir: folder for the activation caches of sessions that ask for one (one subfolder per cache
            id); None uses ``<cache_dir>/server``. An embedded server uses the run's log folder.
        allowed_backbones: backbones (``BackboneConfig.source`` values) a split-learning server may load
            when a device asks; None allows the packaged offline models only. The side server never
            loads a backbone.
    """

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    token_env: str = "MOBILLM_TOKEN"
    device: str = "auto"
    precision: Literal["32", "bf16-mixed"] = "32"
    grad_clip: float | None = 1.0
    max_frame_mb: int = 512
    max_sessions: int = 64
    max_workers: int = 8
    threads: int | None = None
    workdir: str | None = None
    allowed_backbones: list[str] | None = None

    def resolved_token(self) -> str | None:
        return self.token or os.environ.get(self.token_env) or None

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
