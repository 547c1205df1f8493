"""Credentials a program presents to a circuits server it calls: a bearer token read from a file
and the TLS files of the channel (CA to verify the server; certificate and key for mutual TLS).

Servers that call another server (the labeler's neuron scientist calls attribution) take them as
``--<peer>-tls-ca``, ``--<peer>-tls-cert``, ``--<peer>-tls-key`` and ``--<peer>-token-file``::

    add_credential_arguments(parser, peer="attribution")
    client = AttributionClient(args.attribution, **credentials_from_args(args, peer="attribution").client_kwargs())
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from circuits_core.errors import InvalidArgument


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientCredentials:
    """What a client presents; empty strings = not used (no TLS file: plaintext, no token: none)."""

    token: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __repr__(self) -> str:  # never show the token
        return (f"ClientCredentials(token={'***' if self.token else ''!r}, tls_ca_file={self.tls_ca_file!r}, "
                f"tls_cert_file={self.tls_cert_file!r}, tls_key_file={self.tls_key_file!r})")

    @property
    def empty(self) -> bool:
        return not (self.token or self.tls_ca_file or self.tls_cert_file or self.tls_key_file)

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments of every SDK client (``AttributionClient(target, **kwargs)``)."""
        return {"token": self.token, "tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file,
                "tls_key_file": self.tls_key_file}  # fmt: skip


def read_token_file(path: str, *, flag: str = "--token-file") -> str:
    """The bearer token held in ``path`` (its content without surrounding whitespace or a UTF-8 BOM).

    InvalidArgument naming ``flag`` when the file cannot be read, is not UTF-8 or is empty; the
    message never shows the file's content."""
    try:
        with open(path, encoding="utf-8-sig") as fh:  # a byte-order mark is not part of the token
            token = fh.read().strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {flag} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"{flag} {path} is not UTF-8 text") from None
    if not token:
        raise InvalidArgument(f"{flag} {path} is empty")
    if any(ch.isspace() for ch in token):
        raise InvalidArgument(f"{flag} {path} must hold one token (it has whitespace inside)")
    return token


def add_credential_arguments(parser: argparse.ArgumentParser, *, peer: str, what: str = "") -> None:
    """Add ``--<peer>-tls-ca/-tls-cert/-tls-key/-token-file`` for the ``peer`` server this program calls."""
    what = what or f"the --{peer} server"
    g = parser.add_argument_group(f"calls to {what}")
    g.add_argument(f"--{peer}-tls-ca", default="", metavar="PATH", help=f"PEM CA to verify {what} over TLS")
    g.add_argument(f"--{peer}-tls-cert", default="", metavar="PATH",
                   help=f"PEM client certificate presented to {what} (mutual TLS; with --{peer}-tls-key)")
    g.add_argument(f"--{peer}-tls-key", default="", metavar="PATH", help=f"PEM private key of --{peer}-tls-cert")
    g.add_argument(f"--{peer}-token-file", default="", metavar="PATH",
                   help=f"file holding the bearer token presented to {what}")


def credentials_from_args(args: argparse.Namespace, *, peer: str) -> ClientCredentials:
    """The credentials the ``add_credential_arguments(peer=...)`` flags describe (the token read now).

    InvalidArgument when only one of the client certificate and key is given, or the token file
    cannot be read or is empty."""
    attr = peer.replace("-", "_")
    cert, key = getattr(args, f"{attr}_tls_cert") or "", getattr(args, f"{attr}_tls_key") or ""
    if bool(cert) != bool(key):
        raise InvalidArgument(f"--{peer}-tls-cert and --{peer}-tls-key go together (mutual TLS)")
    token_file = getattr(args, f"{attr}_token_file") or ""
    token = read_token_file(token_file, flag=f"--{peer}-token-file") if token_file else ""
    return ClientCredentials(token=token, tls_ca_file=getattr(args, f"{attr}_tls_ca") or "", tls_cert_file=cert,
                             tls_key_file=key)
