"""Shared ``--token-file`` / ``--tls-ca`` flags of the CLI commands that talk to a remote server."""

from __future__ import annotations

import argparse

from circuits_core.errors import InvalidArgument

#: Environment variable holding the bearer token when no ``--token-file`` is given.
TOKEN_ENV = "CIRCUITS_TOKEN"


def add_remote_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--token-file PATH`` and ``--tls-ca PATH`` (used only with ``--remote``)."""
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help=f"file holding the bearer token for --remote (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", default=None, metavar="PATH",
                        help="CA certificate (PEM) to verify the --remote server over TLS")


def remote_auth(args: argparse.Namespace) -> dict[str, str]:
    """``token`` / ``tls_ca_file`` keyword arguments for a client, from the flags (or $CIRCUITS_TOKEN).

    The token is the ``--token-file`` content stripped of surrounding whitespace; InvalidArgument
    when that file cannot be read or is empty.
    """
    from circuits_core.config import env_setting

    token_file = getattr(args, "token_file", None) or ""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read --token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise InvalidArgument(f"--token-file {token_file} is empty")
    else:
        token = env_setting(TOKEN_ENV).strip()
    return {"token": token, "tls_ca_file": getattr(args, "tls_ca", None) or ""}
