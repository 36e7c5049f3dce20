"""``ServerConfig``: the settings of a server process, shared by ``serve``, the embedded server a device
starts, and the in-process link. A plain dataclass, so it is a YAML section and a JSON object alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning_mobillm.assets import cache_dir


@dataclass
class ServerConfig:
    """Settings of a server process (either role).

    Args:
        host: interface to listen on (``0.0.0.0`` to accept remote devices).
        port: port to listen on; 0 picks a free one.
        token: shared secret devices must present; if None, read from the ``token_env`` variable; if that
            is unset too, the server accepts any device (loopback use only).
        token_env: environment variable holding the token.
        device: where the side network trains: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``
            (Fabric's accelerator and device).
        devices: how many devices of that kind Fabric trains on (``device: cuda`` only).
        fabric_strategy: Fabric's strategy for the server's training engine (``auto``, ``ddp``, ...; only
            the single-device CPU engine is tested here).
        precision: Fabric precision of the server's steps: ``32``, ``bf16-mixed`` (autocast) or ``16-mixed``.
        grad_clip: max global gradient norm per step (None disables clipping).
        max_frame_mb: frames larger than this are refused.
        max_sessions: how many device sessions may be open at once.
        max_workers: gRPC worker threads.
        threads: torch intra-op threads of a server process (None keeps torch's default); an in-process
            server shares its caller's threads and leaves them alone.
        workdir: folder for the server's own checkpoints (``server-checkpoints/``) and the activation caches of
            sessions that ask for one (one subfolder per cache id); None uses ``<cache_dir>/server``. An
            embedded server uses the run's log folder.
        checkpoint_every_n_steps: a session's model, optimizer, scheduler and step are written to the
            workdir every n training steps (and whenever a device fetches the state), so a restarted server
            continues a session that says hello with ``resume: true``; 0 disables.
        allowed_backbones: backbones (``BackboneConfig.source`` values) a split-learning server may load
            when a device asks; None allows the packaged offline models only. The side server never
            loads a backbone.
    """

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    token_env: str = "MOBILLM_TOKEN"
    device: str = "auto"
    devices: int = 1
    fabric_strategy: str = "auto"
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    grad_clip: float | None = 1.0
    max_frame_mb: int = 512
    max_sessions: int = 64
    max_workers: int = 8
    threads: int | None = None
    workdir: str | None = None
    checkpoint_every_n_steps: int = 50
    allowed_backbones: list[str] | None = None

    def resolved_token(self) -> str | None:
        return self.token or os.environ.get(self.token_env) or None

    def root(self) -> Path:
        """The server's working folder."""
        return Path(self.workdir) if self.workdir else cache_dir() / "server"
