"""The shared ``--remote HOST:PORT`` / ``--token-file`` / ``--tls-ca`` flags of the commands that can
run on a server instead of in process, and the :class:`~circuits.backends.Remote` they describe."""

from __future__ import annotations

import argparse

from circuits.backends import Remote

#: Environment variable holding the bearer token when no ``--token-file`` is given.
TOKEN_ENV = "CIRCUITS_TOKEN"


def add_remote_arguments(parser: argparse.ArgumentParser, *, service: str, instead_of: str) -> None:
    """Add ``--remote HOST:PORT`` (use the ``service`` server instead of ``instead_of``) and the auth flags."""
    parser.add_argument("--remote", default=None, metavar="HOST:PORT", help=f"use the {service} server at HOST:PORT instead of {instead_of}")
    add_auth_arguments(parser)


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--token-file PATH`` and ``--tls-ca PATH`` for the servers a command talks to."""
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help=f"file holding the bearer token for --remote (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", default=None, metavar="PATH",
                        help="CA certificate (PEM) to verify the --remote server over TLS")


def remote_from_args(
    args: argparse.Namespace, *, timeout: float | None = None, default_address: str = "", address: str | None = None
) -> Remote | None:
    """The server ``address`` (default: ``--remote``, else ``default_address``) with the credentials
    of the flags (token from ``--token-file`` or $CIRCUITS_TOKEN), or None when there is none.

    The token is the ``--token-file`` content stripped of surrounding whitespace; InvalidArgument
    when that file cannot be read, is empty or holds more than one word
    (:func:`circuits_sdk.credentials.read_token_file`).
    """
    from circuits_core.config import env_setting

    if address is None:
        address = getattr(args, "remote", None) or default_address
    if not address:
        return None
    token_file = getattr(args, "token_file", None) or ""
    if token_file:
        from circuits_sdk.credentials import read_token_file

        token = read_token_file(token_file, flag="--token-file")
    else:
        token = env_setting(TOKEN_ENV).strip()
    return Remote(address=address, token=token, tls_ca_file=getattr(args, "tls_ca", None) or "", timeout=timeout)
