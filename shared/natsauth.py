"""NATS credentials: nkey users, one per role (and one per node's agent), and how clients connect with them.

Why nkeys in the server config rather than decentralized JWT accounts: a home or lab cluster is one
operator and one account, and every permission then sits in one file the operator can read and diff
(`nats.conf`), with no resolver, operator key or JWT library to keep (PyPI's `nats-jwt` calls itself
"not well-tested"); `nkeys` is nats-io's own package and nats-py's own dependency for this. A new node
is one more user in that file and a config reload (re-run `magi cluster init`, `systemctl reload
magi-nats`); JWTs would spare the reload, at the cost of all the machinery above.

A seed file (`<identity>.nk`, mode 0600) holds the private seed; the server config holds only the
public key. Seeds never enter git: they live under `$MAGI_HOME/secrets/nats/` or wherever
`MAGI_NATS_CREDS` points (systemd's `LoadCredential=` in a cluster).
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

import nkeys

from shared.config import Settings
from shared.roles import inbox_prefix, permissions


def secrets_dir(home: Path) -> Path:
    return home / "secrets" / "nats"


def write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by its owner only, from the first byte (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def ensure_seed(directory: Path, identity: str) -> str:
    """The public key of `identity`, creating its seed file on first use."""
    permissions(identity)  # refuses unknown roles and bad node names before anything is written
    path = directory / f"{identity}.nk"
    if not path.exists():
        write_private(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) + b"\n")
    return public_key(path)


def public_key(seed_file: Path) -> str:
    return nkeys.from_seed(bytearray(seed_file.read_bytes().strip())).public_key.decode()


def users(directory: Path) -> dict[str, str]:
    """identity -> public key for every seed file in `directory`."""
    return {p.stem: public_key(p) for p in sorted(directory.glob("*.nk"))}


def authorization_block(identities: dict[str, str]) -> str:
    """nats-server's `authorization` block: one nkey user per identity with its role's permissions.

    Written as JSON, which nats-server's config format accepts (quoted strings keep `$JS.>` literal).
    """
    entries = [{"nkey": key, "permissions": permissions(identity).nats_block()}
               for identity, key in sorted(identities.items())]
    return "authorization: " + json.dumps({"users": entries}, indent=2) + "\n"


def tls_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def find_ca(settings: Settings) -> str:
    if settings.nats_ca:
        return settings.nats_ca
    local = settings.home_path / "secrets" / "tls" / "ca.pem"
    return str(local) if local.exists() else ""


def find_seed(settings: Settings, identity: str) -> str:
    """`MAGI_NATS_CREDS` when set; else this identity's seed under `$MAGI_HOME` (the local stack's)."""
    if settings.nats_creds:
        return settings.nats_creds
    local = secrets_dir(settings.home_path) / f"{identity}.nk"
    return str(local) if local.exists() else ""


def connect_options(settings: Settings, identity: str) -> dict:
    """Keyword arguments for `nats.connect`: the identity's seed, its inbox space, TLS when a CA is known."""
    options: dict = {"inbox_prefix": inbox_prefix(identity)}
    seed = find_seed(settings, identity)
    if seed:
        options["nkeys_seed"] = seed
    ca = find_ca(settings)
    if ca:
        options["tls"] = tls_context(ca)
    return options
