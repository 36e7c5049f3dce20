"""``python -m lightning_mobillm {fit,validate,test,predict,serve} --config ...``.

``fit``/``validate``/``test``/``predict`` are Lightning's own subcommands (a ``LightningCLI``): the
model, the data module, the strategy and the callbacks are chosen in the YAML by ``class_path`` and
every option is typed and documented where it is defined (``--help`` shows it). ``serve`` runs a
standalone side-network server for devices on other machines.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import lightning_mobillm.strategies  # noqa: F401  (registers the ``mobillm`` strategy)


def _wandb_offline_without_key() -> None:
    """A run must never need the network: without W&B credentials, log offline (``wandb sync`` later)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


class MobiLLMCLI(LightningCLI):
    """LightningCLI with the data module's class count linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def serve_main(argv: list[str]) -> None:
    """``serve``: parse a :class:`ServerConfig` from ``--config`` / flags and serve until stopped."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lightning_mobillm.server.app import ROLES, serve
    from lightning_mobillm.server.runtime import ServerConfig

    parser = ArgumentParser(prog="python -m lightning_mobillm serve", description=serve.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with the keys below")
    parser.add_argument("--role", choices=sorted(ROLES), default="side",
                        help="side: the MobiLLM/PAE side-network server; split: the split-learning baseline's")
    parser.add_class_arguments(ServerConfig, "server")
    cfg = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[server %(process)d] %(levelname)s %(message)s")
    serve(ServerConfig(**cfg.server.as_dict()), role=cfg.role)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve_main(argv[1:])
        return
    _wandb_offline_without_key()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    MobiLLMCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"strategy": "mobillm"},
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
