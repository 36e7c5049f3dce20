"""``python -m lightning_mobillm {fit,validate,test,predict,serve,token} --config ...``.

``fit``/``validate``/``test``/``predict`` are Lightning's own subcommands (a ``LightningCLI``): the
model, the data module, the strategy and the callbacks are chosen in the YAML by ``class_path`` and
every option is typed and documented where it is defined (``--help`` shows it). ``serve`` runs a server
for devices on other machines; a device's embedded server is started through the same entry. A server
never takes a token on its command line (it would show in ``ps``): ``token`` makes a device's entry in
a server's tokens file (``server.tokens_file``) and prints the device's token once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
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
    "token": "add a device to a server's tokens file (prints its token once), or --revoke it",
}

TOP_HELP = f"""usage: {PROG} {{{",".join(SUBCOMMANDS)}}} [--config RECIPE.yaml] [options]

Server-assisted fine-tuning of LLMs from mobile devices, on PyTorch Lightning.

subcommands:
{chr(10).join(f"  {name:<10}{text}" for name, text in SUBCOMMANDS.items())}

Run `{PROG} <subcommand> --help` for the options of one subcommand, e.g.
  {PROG} fit --config recipes/quickstart.yaml
  {PROG} token --identity phone-1 --file tokens.txt
  {PROG} serve --server.host 0.0.0.0 --server.port 50051 --server.tokens_file tokens.txt \\
      --server.tls_cert_file server.pem --server.tls_key_file server.key
"""

#: added to a parse error that mentions a token option: where tokens come from instead
TOKEN_HINT = ("a server takes no token on its command line or in its config (it would show in `ps` and be "
              "saved with the config): give per-device tokens with --server.tokens_file (entries made by "
              f"`{PROG} token`), or one shared token in the environment variable named by --server.token_env "
              "(default MOBILLM_TOKEN) or in --server.token_file")


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

    # exit_on_error=False: a parse error is reported below (with a hint for token options);
    # allow_abbrev=False: an option is never taken for a longer one it abbreviates
    parser = ArgumentParser(prog=f"{PROG} serve", description=SUBCOMMANDS["serve"], exit_on_error=False,
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file (or string) with the keys below")
    parser.add_argument("--role", choices=list(ROLES), default="side",
                        help="side: the MobiLLM/PAE side-network server; split: the split-learning baseline's; fed: Fed "
                             "MobiLLM's shared side network")
    parser.add_argument("--parent_pid", type=int | None, default=None,
                        help="exit when this process is gone (set by a device that embeds the server)")
    parser.add_class_arguments(ServerConfig, "server")
    try:
        cfg = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        message = str(err)
        if re.search(r"--server\.token\b(?!_)|option 'token'", message):
            message += f"\n{TOKEN_HINT}"
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    # the server runtime loads only in a server process
    from lightning_mobillm.server.app import ServerSetupError, serve

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[server %(process)d] %(levelname)s %(message)s")
    try:
        serve(ServerConfig(**cfg.server.as_dict()), role=cfg.role, parent_pid=cfg.parent_pid)
    except ServerSetupError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def token_main(argv: list[str]) -> None:
    """``token``: add ``--identity`` to the tokens file ``--file`` and print its new token, or ``--revoke`` it."""
    from lightning_mobillm.transport.security import IDENTITY_RE, hash_token, new_token, parse_tokens

    parser = argparse.ArgumentParser(
        prog=f"{PROG} token", description=SUBCOMMANDS["token"], allow_abbrev=False,
        epilog="The token is printed once, on stdout, and stored nowhere: the file holds only its sha256. "
               "Give it to the device (e.g. in its MOBILLM_TOKEN environment variable). A running server "
               "re-reads the file when it changes: a revoked device is refused on its next call.")
    parser.add_argument("--identity", required=True, help="the device's name: 1-64 characters of [A-Za-z0-9_.@-]")
    parser.add_argument("--file", required=True, type=Path, help="the tokens file (created with mode 0600)")
    parser.add_argument("--revoke", action="store_true", help="remove the identity's line instead")
    args = parser.parse_args(argv)
    if not IDENTITY_RE.fullmatch(args.identity):
        parser.error("--identity must be 1-64 characters of [A-Za-z0-9_.@-]")
    path: Path = args.file
    text = path.read_text() if path.exists() else ""
    try:
        table = parse_tokens(text, source=str(path))
    except ValueError as err:
        parser.error(f"{err} (fix the file first)")
    if args.revoke:
        if args.identity not in table:
            parser.error(f"{args.identity!r} is not in {path}")
        kept = [ln for ln in text.splitlines(keepends=True) if ln.split()[:1] != [args.identity]]
        # write a new file and rename it over the old one: a server never reads a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", text=True)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        print(f"revoked {args.identity!r} in {path}", file=sys.stderr)
        return
    if args.identity in table:
        parser.error(f"{args.identity!r} is already in {path} (--revoke it first to issue a new token)")
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(("" if not text or text.endswith("\n") else "\n") + f"{args.identity} {hash_token(token)}\n")
    if os.stat(path).st_mode & 0o077:
        print(f"warning: {path} is readable by other users (chmod 600 it)", file=sys.stderr)
    print(token)


def main(argv: list[str] | None = None) -> None:
    """Entry point. ``argv=None`` reads ``sys.argv`` (and LightningCLI is left to read it itself)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(TOP_HELP, end="")
        return
    if args[0] == "serve":
        serve_main(args[1:])
        return
    if args[0] == "token":
        token_main(args[1:])
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
