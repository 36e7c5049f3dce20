"""``python -m lightning_mobillm {fit,validate,test,predict,serve} --config ...``.

``fit``/``validate``/``test``/``predict`` are Lightning's own subcommands (a ``LightningCLI``): the
model, the data module, the strategy and the callbacks are chosen in the YAML by ``class_path`` and
every option is typed and documented where it is defined (``--help`` shows it). ``serve`` runs a server
for devices on other machines; a device's embedded server is started through the same entry.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import lightning_mobillm.strategies  # noqa: F401  (registers the ``mobillm`` strategy)

PROG = "python -m lightning_mobillm"

SUBCOMMANDS = {
    "fit": "train a model (MobiLLM, PAE, a baseline) from a recipe",
    "validate": "run one validation epoch",
    "test": "run one test epoch",
    "predict": "predict with a trained model",
    "serve": "run a server that devices on other machines train with (MobiLLM/PAE side server, or split)",
}

TOP_HELP = f"""usage: {PROG} {{{",".join(SUBCOMMANDS)}}} [--config RECIPE.yaml] [options]

Server-assisted fine-tuning of LLMs from mobile devices, on PyTorch Lightning.

subcommands:
{chr(10).join(f"  {name:<10}{text}" for name, text in SUBCOMMANDS.items())}

Run `{PROG} <subcommand> --help` for the options of one subcommand, e.g.
  {PROG} fit --config recipes/quickstart.yaml
  {PROG} serve --server.host 0.0.0.0 --server.port 50051
"""


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

    from lightning_mobillm.client import ROLES
    from lightning_mobillm.server_config import ServerConfig

    parser = ArgumentParser(prog=f"{PROG} serve", description=SUBCOMMANDS["serve"])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file (or string) with the keys below")
    parser.add_argument("--role", choices=list(ROLES), default="side",
                        help="side: the MobiLLM/PAE side-network server; split: the split-learning baseline's")
    parser.add_argument("--parent_pid", type=int | None, default=None,
                        help="exit when this process is gone (set by a device that embeds the server)")
    parser.add_class_arguments(ServerConfig, "server")
    cfg = parser.parse_args(argv)
    from lightning_mobillm.server.app import serve  # the server runtime loads only in a server process

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[server %(process)d] %(levelname)s %(message)s")
    serve(ServerConfig(**cfg.server.as_dict()), role=cfg.role, parent_pid=cfg.parent_pid)


def main(argv: list[str] | None = None) -> None:
    """Entry point. ``argv=None`` reads ``sys.argv`` (and LightningCLI is left to read it itself)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(TOP_HELP, end="")
        return
    if args[0] == "serve":
        serve_main(args[1:])
        return
    _wandb_offline_without_key()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    MobiLLMCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"strategy": "mobillm"},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG},
        args=argv,  # None: LightningCLI reads sys.argv (passing both makes it warn)
    )
