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

    Who may call (see ``docs/threat-model.md``):

    Args:
        host: interface to listen on (``0.0.0.0`` to accept remote devices).
        port: port to listen on; 0 picks a free one.
        tokens_file: per-device credentials, one ``<identity> <sha256 hex of the token>`` line per device
            (``#`` comments); re-read when the file changes, so deleting a line revokes that device. A call's
            token names its identity; a session belongs to the identity that opened it. Make entries with
            ``python -m lightning_mobillm token --identity NAME --file PATH``.
        token_env: environment variable holding one *shared* token (an explicit, weaker choice: every holder
            is trusted to name its own ``device_id``); never taken from the command line.
        token_file: a file holding the shared token (instead of ``token_env``).
        tls_cert_file, tls_key_file: the server's certificate chain and private key (PEM): the link runs
            over TLS.
        tls_client_ca_file: with TLS, require client certificates signed by this CA (mutual TLS).
        allow_insecure: serve on a non-loopback address without TLS or without a token. Refused otherwise.
        device: where the side network trains: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``
            (Fabric's accelerator and device).
        devices: how many devices of that kind Fabric trains on (``device: cuda`` only).
        fabric_strategy: Fabric's strategy for the server's training engine (``auto``, ``ddp``, ...; only
            the single-device CPU engine is tested here).
        precision: Fabric precision of the server's steps: ``32``, ``bf16-mixed`` (autocast) or ``16-mixed``.
        grad_clip: max global gradient norm per step (None disables clipping).
        max_frame_mb: frames larger than this are refused by the transport before they are decoded
            (sized to the largest shipped recipe's training frame with headroom).
        max_reply_mb: the largest reply the server sends, and (for the device, from the strategy's
            ``embedded`` settings) the largest it accepts. Replies are the server's own: the largest is a side
            network's whole state with its optimizer, which checkpoints and the end of ``fit`` download (199 MB on
            Qwen2.5-Coder-1.5B, over ``max_frame_mb``). A larger reply is refused with an error that names this key.
        max_concurrent_rpcs: authenticated calls in the gRPC server at once (running or waiting for a
            worker); more are refused with RESOURCE_EXHAUSTED before their body is read.
        max_calls_per_identity: the same bound for one identity of ``tokens_file`` (two calls for each of
            ``max_sessions_per_identity`` sessions by default), so that one device cannot take every place.
        max_workers: gRPC worker threads.
        max_concurrent_steps: frames decoded and computed at once (training and evaluation steps, every
            session together); the others wait their turn. Each step's transient memory (the dequantised
            activations, the side network's forward and backward) counts once per place, so this bounds the
            server's memory beyond its sessions; one step already uses every intra-op thread.
        release_memory: a ``serve`` process caps glibc's malloc arenas at 2 and returns freed memory to the
            system after every step (see ``lightning_mobillm/server/memory.py`` for why and what it saves).
        keepalive_s: how often the server pings an idle connection (and the least ping interval it allows
            a client).
        max_connection_idle_s: connections idle this long are closed.
        max_sessions: sessions open at once, over all identities.
        max_sessions_per_identity: sessions one identity may hold open at once.
        session_idle_s: a session without a frame for this long is checkpointed and closed to free its
            memory; its device resumes it with a hello that says ``resume: true``.
        max_taps, max_width, max_outputs: bounds on what a hello may ask for.
        max_session_mb: bound on a session's model at hello (weights, gradients, AdamW moments and the
            step's undo copy: ``engine.BYTES_PER_PARAMETER`` bytes a parameter, counted before anything is
            allocated).
        max_tokens_per_frame: bound on the token rows of one frame, checked before it is dequantised.
        cache_memory_mb: memory an activation cache may use before it spills to disk (per session; a
            device may ask for less, never more).
        cache_disk_mb: disk an activation cache may use (per session); beyond it, new samples are not
            cached and the device forwards them again.
        threads: torch intra-op threads of a server process (None keeps torch's default); an in-process
            server shares its caller's threads and leaves them alone.
        workdir: folder for the server's own checkpoints (``server-checkpoints/``) and the activation caches
            of sessions that ask for one; None uses ``<cache_dir>/server``. An embedded server uses the run's
            log folder.
        checkpoint_every_n_steps: a session's model, optimizer, scheduler and step are written to the
            workdir every n training steps (and at each set_state and idle expiry), so a restarted server
            continues a session that says hello with ``resume: true``; 0 disables.
        allowed_backbones: backbones (``BackboneConfig.source`` values) a split-learning server may load
            when a device asks; None allows the packaged offline models only. The side server loads no
            backbone, only, for a generative (``causal_lm``) session, the final norm and LM head of an allowed
            one (an alias, or a local folder matched by its name) checked against the device's digest, once per
            server and shared by its sessions. For the ``fed`` role: the backbone type keys
            (``<name>/<arch>/d<width>-L<depth>``, :class:`~lightning_mobillm.fed.alignment.BackboneType`)
            whose devices may join; None admits every well-formed type.

    Fed MobiLLM (``serve --role fed``: one shared side network, see ``lightning_mobillm/server/fed.py``).
    The federation's shape is taken from these settings when they are set, else from the first hello; a
    hello that disagrees with it is refused. Set them on a server that untrusted devices reach, so that the
    first device cannot choose them:

    Args:
        fed_k: the number of aligned taps K (the depth of the federation's shallowest backbone).
        fed_out_dim: the width of the devices' targets (their transform's ``out_dim``).
        fed_d_star: the shared width d*; None: the lower median of the allow-list's widths when
            ``allowed_backbones`` names types, else the first device's width.
        fed_target_space: ``device`` (a head per device), ``federation`` or ``plain`` (one shared head).
        fed_batch_size: samples per optimizer step of the shared model (arrival and replay steps alike).
        fed_lr: AdamW's learning rate of the shared model (constant).
        fed_seed: seeds the shared model's initial weights and the replay order.
        fed_replay: replay the cache of every accepted upload (shuffled) whenever no upload waits.
        fed_max_replay_steps: replay steps after the last arrival before the server waits for the next one.
        fed_max_samples_per_device: a device's quota of samples over all its uploads (None: no quota): how
            much one device can weigh in the shared model, and in the server's memory.
        fed_max_devices: devices a federation admits (those that uploaded or are connected); with the quota it
            bounds the upload cache (devices x quota x K x width x 4 bytes), also where a shared token lets any
            caller name new device ids.
        fed_head_rank: an integer r (default 16): a shared neck maps the trunk's d* states to r first and each
            device's head is r x out_dim (a small map a device's few samples can fit); None: no neck, each head
            maps the d* states to its targets.
        fed_download_dtype: the dtype of the parts a device downloads to evaluate (``float16`` halves the
            downlink of ``float32``; the device computes in fp32 either way).
    """

    host: str = "127.0.0.1"
    port: int = 0
    tokens_file: str | None = None
    token_env: str = "MOBILLM_TOKEN"
    token_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    allow_insecure: bool = False
    device: str = "auto"
    devices: int = 1
    fabric_strategy: str = "auto"
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    grad_clip: float | None = 1.0
    max_frame_mb: int = 128
    max_reply_mb: int = 1024
    max_concurrent_rpcs: int = 64
    max_calls_per_identity: int = 8
    max_workers: int = 8
    max_concurrent_steps: int = 1
    release_memory: bool = True
    keepalive_s: float = 60.0
    max_connection_idle_s: float = 900.0
    max_sessions: int = 64
    max_sessions_per_identity: int = 4
    session_idle_s: float = 1800.0
    max_taps: int = 128
    max_width: int = 16384
    max_outputs: int = 4096
    max_session_mb: float = 2048.0
    max_tokens_per_frame: int = 16384
    cache_memory_mb: float = 512.0
    cache_disk_mb: float = 8192.0
    threads: int | None = None
    workdir: str | None = None
    checkpoint_every_n_steps: int = 50
    allowed_backbones: list[str] | None = None
    fed_k: int | None = None
    fed_out_dim: int | None = None
    fed_d_star: int | None = None
    fed_target_space: Literal["device", "federation", "plain"] | None = None
    fed_batch_size: int = 32
    fed_lr: float = 1e-3
    fed_seed: int = 0
    fed_replay: bool = True
    fed_max_replay_steps: int = 1000
    fed_max_samples_per_device: int | None = 4096
    fed_max_devices: int = 256
    fed_download_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    fed_head_rank: int | None = 16  # fed.model.DEFAULT_HEAD_RANK (a test keeps them equal)

    #: limits that must be positive (a zero or negative one would refuse everything or nothing)
    _POSITIVE = ("max_frame_mb", "max_reply_mb", "max_concurrent_rpcs", "max_calls_per_identity", "max_workers",
                 "max_concurrent_steps", "keepalive_s", "max_connection_idle_s", "max_sessions",
                 "max_sessions_per_identity", "session_idle_s", "max_taps", "max_width", "max_outputs",
                 "max_session_mb", "max_tokens_per_frame", "devices", "fed_batch_size", "fed_max_replay_steps",
                 "fed_max_devices")
    #: fed settings that are None (taken from the first hello, or unbounded) or a positive integer
    _OPTIONAL_COUNTS = ("fed_k", "fed_out_dim", "fed_d_star", "fed_max_samples_per_device", "fed_head_rank")

    def __post_init__(self) -> None:
        for key in self._POSITIVE:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"server.{key} must be a positive number, got {value!r}")
        for key in ("cache_memory_mb", "cache_disk_mb", "checkpoint_every_n_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"server.{key} must be a number >= 0, got {value!r}")
        for key in (*self._OPTIONAL_COUNTS, "fed_batch_size", "fed_max_replay_steps", "fed_seed"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"server.{key} must be an integer, got {value!r}")
        for key in self._OPTIONAL_COUNTS:
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"server.{key} must be None or an integer >= 1, got {getattr(self, key)!r}")
        if self.fed_seed < 0:
            raise ValueError(f"server.fed_seed must be >= 0, got {self.fed_seed!r}")
        if isinstance(self.fed_lr, bool) or not isinstance(self.fed_lr, (int, float)) or not 0 < self.fed_lr <= 10:
            raise ValueError(f"server.fed_lr must be a number in (0, 10], got {self.fed_lr!r}")
        if self.fed_target_space not in (None, "device", "federation", "plain"):
            raise ValueError(f"server.fed_target_space must be device, federation or plain, got "
                             f"{self.fed_target_space!r}")
        if self.fed_download_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"server.fed_download_dtype must be float32, float16 or bfloat16, got "
                             f"{self.fed_download_dtype!r}")

    def resolved_token(self) -> str | None:
        """The shared token: from ``token_file`` if set, else the ``token_env`` variable; None if neither."""
        if self.token_file:
            text = Path(self.token_file).read_text().strip()
            if not text:
                raise ValueError(f"token_file {self.token_file} is empty")
            return text
        return os.environ.get(self.token_env) or None

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * 2**20)

    @property
    def max_reply_bytes(self) -> int:
        return int(self.max_reply_mb * 2**20)

    def root(self) -> Path:
        """The server's working folder."""
        return Path(self.workdir) if self.workdir else cache_dir() / "server"
