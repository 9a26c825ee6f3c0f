"""Chaos: a steady stream of missions through both entry points while every kind of process is killed.

`run_chaos` starts a private local stack (its keeper restarts what dies), sends missions through
`magi.mission.submit` and `magi.mission.run` in turn, and meanwhile `kill -9`s the orchestrator, the
inference, memory and consensus services, the scheduler and the agent once each, then the NATS server.
A `run` caller whose reply is lost does what the README tells users: it reads `magi.mission.get`, and
sends the same mission id again if nothing was stored. Then every mission is checked: one result
message in the results stream, one consensus record whose votes are that mission's clones.

`measure_redelivery` times `kill -9` of the orchestrator to its in-flight missions running again.
`measure_pause` SIGSTOPs an agent for 2 s and counts placement changes (none should happen).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from magi import stack
from magi.procs import free_port
from protos.consensus import ConsensusRecord, GetRequest
from protos.mission import RESULT_STREAM, MissionGet, MissionReply, MissionRequest
from protos.sched import ReleaseReply, ReleaseRequest
from shared import bus
from shared.errors import MagiError, NotFound

KILLS = ("orchestrator", "inference", "memory", "consensus", "scheduler", "agent", "nats")
_encoder = msgspec.json.Encoder()


@dataclass
class Tally:
    accepted: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # mission id -> the error it ended with


def mission(mission_id: str) -> MissionRequest:
    return MissionRequest(prompt=f"Name one colour ({mission_id}).", variations=["in one word"], max_tokens=8,
                          deadline_s=60, mission_id=mission_id, context_needed=True)


def pid_of(home: Path, name: str) -> int:
    return next(pid for n, pid, _, _ in stack.status(home) if n == name)


async def wait_restarted(home: Path, nats_url: str, name: str, old: int, timeout: float = 120.0) -> None:
    """The keeper started it again and (for a service) it answers `$SRV.PING`."""
    deadline = time.monotonic() + timeout
    while pid_of(home, name) == old:
        assert time.monotonic() < deadline, f"{name} was not restarted"
        await asyncio.sleep(0.2)
    if name in ("nats",):
        return
    nc = await stack.connect_as(home, nats_url, reconnect_time_wait=0.2)
    try:
        while True:
            try:
                await nc.request(f"$SRV.PING.magi-{name}", b"", timeout=1)
                return
            except Exception:
                assert time.monotonic() < deadline, f"{name} did not answer after its restart"
                await asyncio.sleep(0.3)
    finally:
        await nc.close()


async def _submit(nc, tally: Tally, mission_id: str) -> None:
    """The queue entry point: accepted once JetStream acknowledged the publish (retried until it is)."""
    for _ in range(60):
        try:
            await nc.jetstream().publish("magi.mission.submit", _encoder.encode(mission(mission_id)),
                                         headers={"Nats-Msg-Id": mission_id}, timeout=2)
            tally.accepted.add(mission_id)
            return
        except Exception:
            await asyncio.sleep(1.0)
    tally.failed[mission_id] = "never accepted by JetStream"


async def _run(nc, tally: Tally, mission_id: str) -> None:
    """The request-reply entry point, used as the README says: on a lost reply, get, else send again."""
    for _ in range(30):
        try:
            await bus.request(nc, "magi.mission.run", mission(mission_id), MissionReply, timeout=20)
            tally.accepted.add(mission_id)
            return
        except MagiError as exc:
            if exc.code < 500:
                tally.failed[mission_id] = exc.message
                return
        try:
            await bus.request(nc, "magi.mission.get", MissionGet(mission_id=mission_id), MissionReply, timeout=5)
            tally.accepted.add(mission_id)
            return
        except MagiError:
            await asyncio.sleep(1.0)
    tally.failed[mission_id] = "never answered"


async def _stream(nc, tally: Tally, stop: asyncio.Event, every_s: float) -> list[asyncio.Task]:
    tasks, n = [], 0
    while not stop.is_set():
        mission_id = f"chaos-{n}"
        entry = _submit if n % 2 == 0 else _run
        tasks.append(asyncio.create_task(entry(nc, tally, mission_id)))
        n += 1
        await asyncio.sleep(every_s)
    return tasks


async def _result_count(nc, mission_id: str) -> int:
    info = await nc.jetstream().stream_info(RESULT_STREAM, subjects_filter=f"magi.mission.result.{mission_id}")
    return sum((info.state.subjects or {}).values())


async def check(nc, mission_ids: set[str], wait_s: float = 240.0) -> dict[str, list[str]]:
    """Every mission answered once: a stored reply, one result message, one consensus record of its clones."""
    problems: dict[str, list[str]] = {"lost": [], "failed": [], "duplicate_results": [], "duplicate_consensus": []}
    deadline = time.monotonic() + wait_s
    for mission_id in sorted(mission_ids):
        while True:
            try:
                reply = await bus.request(nc, "magi.mission.get", MissionGet(mission_id=mission_id), MissionReply,
                                          timeout=5)
                break
            except NotFound:
                if time.monotonic() > deadline:
                    problems["lost"].append(mission_id)
                    reply = None
                    break
                await asyncio.sleep(1.0)
            except MagiError as exc:
                problems["failed"].append(f"{mission_id}: {exc.code} {exc.message}"[:200])
                reply = None
                break
        if await _result_count(nc, mission_id) > 1:
            problems["duplicate_results"].append(mission_id)
        if reply is None:
            continue
        record = await bus.request(nc, "magi.consensus.get", GetRequest(mission_id=mission_id), ConsensusRecord,
                                   timeout=10)
        if record.copies != 1 or len(record.votes) != len(reply.clones) or record.id != reply.consensus.id:
            problems["duplicate_consensus"].append(mission_id)
    return problems


def chaos_config(home: Path) -> stack.StackConfig:
    # A short ack wait so a killed orchestrator's missions come back quickly under test.
    return stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), node_name="chaos",
                             extra_env={"MAGI_MISSION_ACK_WAIT_S": "3"})


async def run_chaos(home: Path, *, every_s: float = 0.5, settle_s: float = 3.0, progress=print) -> dict:
    state = await stack.up(chaos_config(home))
    try:
        nc = await stack.connect_as(home, state.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        tally, stop = Tally(), asyncio.Event()
        streaming = asyncio.create_task(_stream(nc, tally, stop, every_s))
        await asyncio.sleep(settle_s)
        for name in KILLS:
            progress(f"kill -9 {name}")
            old = pid_of(home, name)
            os.kill(old, signal.SIGKILL)
            await wait_restarted(home, state.nats_url, name, old)
            await asyncio.sleep(settle_s)
        stop.set()
        await asyncio.gather(*await streaming)
        progress(f"checking {len(tally.accepted)} missions")
        problems = await check(nc, tally.accepted)
        await nc.close()
        problems["failed"] += [f"{k}: {v}" for k, v in tally.failed.items()]
        return {"missions": len(tally.accepted), **problems}
    finally:
        stack.down(home)


async def measure_chaos(progress=print) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="magi-chaos-") as tmp:
        outcome = await run_chaos(Path(tmp), progress=progress)
    return {"chaos.missions": outcome["missions"],
            "chaos.missions_lost": len(outcome["lost"]) + len(outcome["failed"]),
            "chaos.duplicate_consensus": len(outcome["duplicate_consensus"]) + len(outcome["duplicate_results"])}


async def measure_redelivery(home: Path, nats_url: str, missions: int = 4, rounds: int = 3) -> float:
    """Seconds from `kill -9` of the orchestrator to its in-flight missions running again (median)."""
    nc = await stack.connect_as(home, nats_url, max_reconnect_attempts=-1)
    samples = []
    try:
        for r in range(rounds):
            ids = [f"redeliver-{r}-{i}-{time.monotonic_ns()}" for i in range(missions)]
            for mission_id in ids:
                await nc.jetstream().publish("magi.mission.submit", _encoder.encode(mission(mission_id)),
                                             headers={"Nats-Msg-Id": mission_id})
            await asyncio.sleep(0.3)  # they are running now
            killed = time.monotonic()
            os.kill(pid_of(home, "orchestrator"), signal.SIGKILL)
            for mission_id in ids:
                while True:
                    try:
                        await bus.request(nc, "magi.mission.get", MissionGet(mission_id=mission_id), MissionReply,
                                          timeout=5)
                        break
                    except MagiError:
                        await asyncio.sleep(0.1)
            samples.append(time.monotonic() - killed)
    finally:
        await nc.close()
    return sorted(samples)[len(samples) // 2]


async def placement_epoch(nc) -> int:
    reply = await bus.request(nc, "magi.sched.release", ReleaseRequest(instance_ids=["no-such-instance"]),
                              ReleaseReply, timeout=5)
    return reply.epoch


async def measure_pause(home: Path, nats_url: str, pause_s: float = 2.0) -> int:
    """Placement changes while an agent is SIGSTOPped for `pause_s` (and a failover grace after)."""
    nc = await stack.connect_as(home, nats_url)
    try:
        before = await placement_epoch(nc)
        agent = pid_of(home, "agent")
        os.kill(agent, signal.SIGSTOP)
        await asyncio.sleep(pause_s)
        os.kill(agent, signal.SIGCONT)
        await asyncio.sleep(4.0)
        return await placement_epoch(nc) - before
    finally:
        await nc.close()


async def measure_recovery(progress=print) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="magi-recovery-") as tmp:
        home = Path(tmp)
        # The default ack wait and heartbeat: the figures are what a user's stack does.
        state = await stack.up(stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(),
                                                 node_name="recovery"))
        try:
            progress("redelivery after kill -9 of the orchestrator")
            redelivery = await measure_redelivery(home, state.nats_url)
            progress("2 s SIGSTOP of the agent")
            moves = await measure_pause(home, state.nats_url)
        finally:
            stack.down(home)
    return {"mission.redelivery_s": round(redelivery, 2), "sched.moves_on_2s_pause": moves}
