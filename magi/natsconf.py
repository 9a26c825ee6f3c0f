"""nats-server configuration files, for the local stack and for a cluster (`magi cluster init`).

Every file has clients pinged every 5 s (one that misses two is dropped), JetStream fsyncing each write (`sync_interval: always`: a mission the server acknowledged
survives a power cut) and an `authorization` block of nkey users (see `shared.natsauth`), so an
anonymous client is refused. With TLS, clients must speak TLS (plaintext is refused) and routes between
servers authenticate each other with certificates from the cluster's CA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shared.natsauth import authorization_block


@dataclass
class Tls:
    cert: Path
    key: Path
    ca: Path


@dataclass
class Routes:
    name: str  # the NATS cluster's name
    listen: str  # host:port of this server's route listener
    peers: list[str] = field(default_factory=list)  # nats-route://host:port of every server (self included)


def _q(value: str | Path) -> str:
    return json.dumps(str(value))


def _tls_block(tls: Tls, *, verify: bool, indent: str = "") -> str:
    lines = [f"cert_file: {_q(tls.cert)}", f"key_file: {_q(tls.key)}", f"ca_file: {_q(tls.ca)}",
             f"verify: {'true' if verify else 'false'}", "timeout: 2"]
    return f"{indent}tls {{\n" + "".join(f"{indent}  {line}\n" for line in lines) + f"{indent}}}\n"


def server_config(*, listen: str, store_dir: Path, users: dict[str, str], tls: Tls | None = None,
                  server_name: str = "", monitor: str = "", routes: Routes | None = None) -> str:
    parts = []
    if server_name:
        parts.append(f"server_name: {_q(server_name)}\n")
    parts.append(f"listen: {_q(listen)}\nmax_payload: 1MB\n")
    # A client that answers no PING for ~10 s (frozen by SIGSTOP, cut off by a partition) is dropped, and with
    # it its queue subscriptions: a paused scheduler leader stops taking requests its successor now serves.
    parts.append('ping_interval: "5s"\nping_max: 2\n')
    if monitor:  # the HTTP monitoring port: loopback only, it has no authentication
        parts.append(f"http: {_q(monitor)}\n")
    parts.append(f"jetstream {{\n  store_dir: {_q(store_dir)}\n  sync_interval: always\n}}\n")
    if tls is not None:
        parts.append(_tls_block(tls, verify=False))  # clients prove who they are with nkeys, not certificates
    if routes is not None:
        if tls is None:
            raise ValueError("routes between NATS servers need TLS: without it any host could join as a route")
        cluster = [f"  name: {_q(routes.name)}\n", f"  listen: {_q(routes.listen)}\n"]
        if routes.peers:
            cluster.append("  routes: [\n" + "".join(f"    {_q(p)}\n" for p in routes.peers) + "  ]\n")
        cluster.append(_tls_block(tls, verify=True, indent="  "))  # servers authenticate each other: mutual TLS
        parts.append("cluster {\n" + "".join(cluster) + "}\n")
    parts.append(authorization_block(users))
    return "".join(parts)
