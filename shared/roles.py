"""Who may do what on the bus: one NATS user per role, its subject permissions enforced by nats-server.

This table is the single source: `magi up` and `magi cluster init` render it into the server's
`authorization` block, and the README's permissions table is generated from it (a test keeps them equal).

Privileged identities (services, agents) draw their reply inboxes from `_MAGI.<identity>.>`, which no
client may subscribe to, so an assignment reply (it can carry an instance's environment) is read by
its agent alone. Clients and admins keep NATS's default `_INBOX.` so `nats req` works unchanged.
Services answer requests through `allow_responses` (a reply to a message they received), so none of
them needs publish rights on other identities' inboxes.

The HTTP gateway is a client of the bus on behalf of API users: a streamed generation sends many messages
to its inbox, which inference may not publish into `_MAGI.` (`allow_responses` allows one reply), so its
inboxes are `_INBOX.gateway.>`, which clients may not read.
"""

from __future__ import annotations

import re

import msgspec

from protos.mission import RESULT_STREAM, SUBMIT_STREAM
from shared.modelstore import STREAM as MODEL_STREAM

SERVICE_ROLES = ("scheduler", "inference", "memory", "consensus", "orchestrator", "gateway")
USER_ROLES = ("client", "admin")
ROLES = (*SERVICE_ROLES, "agent", *USER_ROLES)

NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # one safe subject token

# Subjects no free-form output (`stream_subject`, `progress_subject`) may target, and no service but
# their owner may publish to. `_MAGI.` is the inbox space of services and agents.
RESERVED_PREFIXES = ("$", "magi.", "_MAGI.")

# What services whose output subjects callers choose (inference, orchestrator) may never publish to,
# whatever a caller asked: the second wall behind the services' own check (`check_output_subject`).
_NEVER = ["$SYS.>", "$KV.>", "$O.>", "$SRV.>", "_MAGI.>", "magi.node.>"]
# Inference reads the model store (its own copy of a model, for the tokenizer, and a replica's where no agent
# answers): of JetStream it may create consumers and read messages and stream info, never change or delete
# a stream or a consumer it did not create, pull from the mission queue (the one durable consumer; a model
# download pulls from an ephemeral consumer of its own, shared/modelstore.py), or ack (and `$O.>`, the store's
# own subjects, stays denied: it cannot write a model). Of the node subjects it may only ask `models.fetch`
# (five tokens; an agent's heartbeat, info, logs and reconcile are four, and their live log lines more).
_JS_CHANGES = ["$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>", "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>",
               "$JS.API.STREAM.MSG.DELETE.>", "$JS.API.STREAM.SNAPSHOT.>", "$JS.API.STREAM.RESTORE.>",
               "$JS.API.STREAM.LEADER.>", "$JS.API.STREAM.PEER.>", "$JS.API.CONSUMER.DURABLE.>",
               "$JS.API.CONSUMER.DELETE.>", f"$JS.API.CONSUMER.MSG.NEXT.{SUBMIT_STREAM}.>", "$JS.API.CONSUMER.PAUSE.>",
               "$JS.API.CONSUMER.UNPIN.>", "$JS.API.CONSUMER.LEADER.>", "$JS.API.ACCOUNT.>", "$JS.API.META.>",
               "$JS.API.SERVER.>", "$JS.ACK.>", "$JS.SNAPSHOT.>"]
_NODE_BUT_MODEL_FETCH = ["magi.node.*.*", "magi.node.*.logs.>", "magi.node.*.*.*.>"]
# Inference also keeps the model catalogue (JetStream KV `magi-catalog`, services/inference/livecatalog.py): it
# creates the bucket and seeds it on its first start (as the orchestrator creates its streams), and its
# autoscaler writes replica counts, so `$KV.>` and creating a stream are not denied to it (there is no other
# KV bucket; `check_output_subject` still refuses any `$` subject a caller names). It releases the placements
# of replicas it removed (`magi.sched.release`).
_CATALOGUE_WRITES = ("$KV.>", "$JS.API.STREAM.CREATE.>")
_INFERENCE_DENY = [*(s for s in _NEVER if s not in ("magi.node.>", *_CATALOGUE_WRITES)), *_NODE_BUT_MODEL_FETCH,
                   *(s for s in _JS_CHANGES if s not in _CATALOGUE_WRITES), "magi.sched.assignments.>", "magi.sched.drain",
                   "magi.sched.rebalance", "magi.mission.>", "magi.memory.>", "magi.infer.>", "magi.consensus.>"]
# The orchestrator pings `$SRV.PING` (two tokens) to notice restarts; it still never answers as a service.
_ORCHESTRATOR_DENY = [*(s if s != "$SRV.>" else "$SRV.*.>" for s in _NEVER), "magi.sched.>", "magi.mission.run",
                      "magi.mission.get", "magi.memory.delete", "magi.infer.cancel", "magi.infer.embed", "magi.consensus.get",
                      "magi.consensus.history",
                      "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>",
                      "$JS.API.CONSUMER.DELETE.>", "$JS.API.ACCOUNT.>", "$JS.API.META.>", "$JS.API.SERVER.>"]


# Subjects only their service (or a node's agent) may answer: no user identity may subscribe to them.
_SERVED = ["magi.sched.>", "magi.mission.run", "magi.mission.get", "magi.mission.submit", "magi.infer.>", "magi.memory.>",
           "magi.consensus.>", "magi.gateway.>", "magi.node.*.info", "magi.node.*.logs", "magi.node.*.reconcile",
           "magi.node.*.models.fetch"]
GATEWAY_INBOX = "_INBOX.gateway"


class Permissions(msgspec.Struct, kw_only=True):
    pub_allow: list[str] = []
    pub_deny: list[str] = []
    sub_allow: list[str] = []
    sub_deny: list[str] = []
    allow_responses: bool = True
    summary: str = ""  # one line for the README table

    def nats_block(self) -> dict:
        """The `permissions` map of a nats-server user."""
        block: dict = {}
        for kind, allow, deny in (("publish", self.pub_allow, self.pub_deny),
                                  ("subscribe", self.sub_allow, self.sub_deny)):
            entry = {k: v for k, v in (("allow", allow), ("deny", deny)) if v}
            # An empty allow list would mean "everything": a role that publishes nothing gets an explicit deny.
            block[kind] = entry or {"deny": [">"]}
        if self.allow_responses:
            block["allow_responses"] = True
        return block


def inbox_prefix(identity: str) -> str:
    """Where an identity's reply inboxes live (see the module docstring)."""
    if identity == "gateway":
        return GATEWAY_INBOX
    return "_INBOX" if identity in USER_ROLES else f"_MAGI.{identity}"


def _service(svc: str, subjects: list[str], identity: str) -> list[str]:
    # nats.micro answers $SRV.PING|INFO|STATS, then .<name> and .<name>.<id>.
    return [*subjects, "$SRV.*", f"$SRV.*.{svc}", f"$SRV.*.{svc}.>", f"{inbox_prefix(identity)}.>"]


def _results_reader() -> list[str]:
    """What reading `magi.mission.result.<id>` from the results stream takes (an ordered consumer)."""
    return _stream_reader(RESULT_STREAM)


def _model_reader() -> list[str]:
    """What nats-py's object store `get()` of a model takes: the bucket's stream info, an object's info (the last
    message on its meta subject), and an ordered consumer of its chunks with flow control (subscribing looks the
    stream up by subject: STREAM.NAMES, names only). No `$O.` subject: a reader publishes none, and an object is
    written there."""
    return ["$JS.API.STREAM.NAMES", f"$JS.API.STREAM.INFO.{MODEL_STREAM}", f"$JS.API.STREAM.MSG.GET.{MODEL_STREAM}",
            f"$JS.API.DIRECT.GET.{MODEL_STREAM}.>", f"$JS.API.CONSUMER.CREATE.{MODEL_STREAM}",
            f"$JS.API.CONSUMER.CREATE.{MODEL_STREAM}.>", f"$JS.API.CONSUMER.INFO.{MODEL_STREAM}.>",
            f"$JS.API.CONSUMER.DELETE.{MODEL_STREAM}.>", f"$JS.API.CONSUMER.MSG.NEXT.{MODEL_STREAM}.>",
            f"$JS.FC.{MODEL_STREAM}.>"]


def _stream_reader(s: str) -> list[str]:
    return ["$JS.API.INFO", "$JS.API.STREAM.NAMES", f"$JS.API.STREAM.INFO.{s}", f"$JS.API.CONSUMER.CREATE.{s}",
            f"$JS.API.CONSUMER.CREATE.{s}.>", f"$JS.API.CONSUMER.INFO.{s}.>", f"$JS.API.CONSUMER.DELETE.{s}.>",
            f"$JS.API.DIRECT.GET.{s}.>", f"$JS.API.STREAM.MSG.GET.{s}", f"$JS.FC.{s}.>", f"$JS.ACK.{s}.>"]


def agent_permissions(node: str) -> Permissions:
    if not NODE_NAME.match(node):
        raise ValueError(f"node name {node!r}: use 1-64 letters, digits, '-' or '_'")
    identity = agent_identity(node)
    return Permissions(
        pub_allow=[f"magi.node.{node}.>", f"magi.sched.assignments.{node}", *_model_reader()],
        sub_allow=_service("magi-agent", [f"magi.node.{node}.info", f"magi.node.{node}.logs",
                                          f"magi.node.{node}.reconcile", f"magi.node.{node}.models.fetch"], identity),
        summary=f"publishes only `magi.node.{node}.>` (heartbeat, logs) and asks `magi.sched.assignments.{node}`; "
                f"serves `magi.node.{node}.info`, `.logs` (instance log tails) and `.models.fetch` (reads the model "
                f"store, never writes it), hears its own reconcile nudges")


def agent_identity(node: str) -> str:
    return f"agent-{node}"


def _role_table() -> dict[str, Permissions]:
    return {
        "scheduler": Permissions(
            pub_allow=["magi.node.*.reconcile"],
            sub_allow=_service("magi-scheduler", ["magi.sched.>", "magi.node.*.heartbeat"], "scheduler"),
            summary="serves `magi.sched.>` (alone may answer place, drain, rebalance, assignments), hears every heartbeat, "
                    "nudges agents"),
        "inference": Permissions(
            pub_allow=[">"], pub_deny=_INFERENCE_DENY,
            sub_allow=_service("magi-inference", ["magi.infer.>"], "inference"),
            summary="serves `magi.infer.>`, asks `magi.sched.place` for its replicas and `magi.node.*.models.fetch` "
                    "for their model files, reads the model store (never writes it, never changes a stream), keeps the "
                    "model catalogue (KV `magi-catalog`: creates and seeds it, watches it, its autoscaler writes it), "
                    "releases removed replicas' placements, streams to callers' subjects (never `$`, `_MAGI.` or other "
                    "services' subjects)"),
        "memory": Permissions(
            pub_allow=["magi.infer.embed"],
            sub_allow=_service("magi-memory", ["magi.memory.>"], "memory"),
            summary="serves `magi.memory.>`, asks `magi.infer.embed`"),
        "consensus": Permissions(
            pub_allow=["magi.infer.embed", "magi.infer.generate"],
            sub_allow=_service("magi-consensus", ["magi.consensus.>"], "consensus"),
            summary="serves `magi.consensus.>`, asks `magi.infer.embed` (to compare answers by meaning) and "
                    "`magi.infer.generate` (the heavy model writes `synthesize` answers)"),
        "orchestrator": Permissions(
            pub_allow=[">"], pub_deny=_ORCHESTRATOR_DENY,
            sub_allow=_service("magi-orchestrator", ["magi.mission.run", "magi.mission.get", "magi.mission.result.>",
                                                     f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{SUBMIT_STREAM}.>"],
                               "orchestrator"),
            summary="serves `magi.mission.run` and `.get`, queues and consumes `magi.mission.submit`, asks memory, "
                    "inference and consensus, remembers answers in memory, stores results, publishes progress "
                    "(never `$SYS`, `_MAGI.` or control subjects; cannot delete or purge streams)"),
        "gateway": Permissions(
            pub_allow=["magi.infer.generate", "magi.infer.cancel", "magi.infer.embed", "magi.infer.models",
                       "magi.mission.run", "magi.mission.get", "magi.consensus.history", "magi.sched.nodes",
                       "magi.sched.report", "magi.node.*.info", "$SRV.PING", "$SRV.INFO", "$SRV.STATS"],
            sub_allow=_service("magi-gateway", ["magi.gateway.>", "magi.node.*.heartbeat", "magi.mission.events.>"],
                               "gateway"),
            summary="the OpenAI-compatible HTTP API, `/metrics` and the dashboard: asks generate (streamed, with its "
                    "own request ids), cancel, embed, models and missions, reads status (nodes, report, history, "
                    "`$SRV` stats), hears heartbeats and mission events; serves `magi.gateway.info`; its inboxes "
                    "`_INBOX.gateway.>` (inference streams there) no client may read"),
        "client": Permissions(
            pub_allow=["magi.mission.run", "magi.mission.get", "magi.mission.submit", "magi.infer.generate", "magi.infer.cancel",
                       "magi.infer.models", "magi.infer.embed", "magi.memory.search", "magi.memory.upsert",
                       "magi.memory.list", "magi.memory.delete", "magi.consensus.get", "magi.consensus.history",
                       "magi.sched.nodes", "magi.sched.report", "magi.node.*.info",
                       "$SRV.>", *_results_reader()],
            sub_allow=[">"], sub_deny=["magi.>", "$SYS.>", "$JS.>", "$KV.>", "$O.>", "$SRV.>", "_MAGI.>",
                                       f"{GATEWAY_INBOX}.>"],
            allow_responses=False,
            summary="missions, generate/cancel/models/embed, memory search/upsert/list/delete, consensus get/history, "
                    "read-only status (nodes, report, node info, `$SRV` discovery), mission results; may not serve "
                    "any `magi.` subject"),
        "admin": Permissions(
            pub_allow=[">"], pub_deny=["magi.node.*.heartbeat", "magi.node.*.logs.>"],
            sub_allow=[">"], sub_deny=_SERVED,
            summary="everything a client may, plus place, release, drain, instance logs, stream management; "
                    "never speaks for a node or answers a service's subject"),
    }


ROLE_PERMISSIONS = _role_table()


def permissions(identity: str) -> Permissions:
    """Permissions of a role name, or of `agent-<node>` for one node's agent."""
    if identity in ROLE_PERMISSIONS:
        return ROLE_PERMISSIONS[identity]
    if identity.startswith("agent-"):
        return agent_permissions(identity.removeprefix("agent-"))
    raise ValueError(f"unknown role {identity!r}; roles: {', '.join(ROLES)}")


def check_output_subject(subject: str) -> str | None:
    """Why a caller-chosen output subject is refused, or None when it may be used."""
    if any(subject.startswith(p) for p in RESERVED_PREFIXES):
        return f"subject {subject!r} is reserved (subjects starting with {', '.join(RESERVED_PREFIXES)} are MAGI's own)"
    if not subject or any(t == "" or t in ("*", ">") for t in subject.split(".")):
        return f"subject {subject!r} must be a plain subject (no empty tokens or wildcards)"
    return None


def markdown_table() -> str:
    """The README's permissions table (a test keeps the README equal to this)."""
    rows = ["| identity | may | publish | subscribe |", "|---|---|---|---|"]
    for identity in (*SERVICE_ROLES, "agent-<node>", *USER_ROLES):
        perms = agent_permissions("NODE") if identity == "agent-<node>" else ROLE_PERMISSIONS[identity]

        def cell(allow: list[str], deny: list[str]) -> str:
            text = ", ".join(f"`{s}`" for s in allow) or "nothing (replies only)"
            return text + (f"; never {', '.join(f'`{s}`' for s in deny)}" if deny else "")

        summary = perms.summary.replace("NODE", "<node>")
        pub = cell(perms.pub_allow, perms.pub_deny).replace("NODE", "<node>")
        sub = cell(perms.sub_allow, perms.sub_deny).replace("NODE", "<node>")
        rows.append(f"| `{identity}` | {summary} | {pub} | {sub} |")
    return "\n".join(rows) + "\n"
