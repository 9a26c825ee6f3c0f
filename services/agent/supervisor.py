"""Runs the instances the scheduler assigns to this node: start, stop, restart with backoff.

This replaces seed 002's SSH RemoteRunner: the agent on the node starts the process itself, keeps
its output in `$MAGI_HOME/instances/<id>.log` and publishes each line on
`magi.node.<node>.logs.<instance>` with the file offset just past it (LOG_OFFSET_HEADER), so `magi logs -f`
joins the file's tail (`read_tail`) to the live lines without a repeat. An instance that keeps failing is
backed off exponentially and, after CRASHLOOP_FAILURES failures inside CRASHLOOP_WINDOW_S, left stopped
and reported as `crashloop`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from protos.node import LOG_OFFSET_HEADER, InstanceStatus
from protos.sched import InstanceSpec
from services.agent.policy import AgentPolicy

log = logging.getLogger("magi.agent.supervisor")

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
CRASHLOOP_FAILURES = 5
CRASHLOOP_WINDOW_S = 60.0
STOP_GRACE_S = 5.0

Publish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]


@dataclass
class Instance:
    spec: InstanceSpec
    epoch: int
    state: str = "starting"
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    exit_code: int | None = None
    failures: list[float] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    stopping: bool = False
    reason: str = ""  # why it was refused

    def status(self) -> InstanceStatus:
        pid = self.proc.pid if self.proc is not None and self.proc.returncode is None else None
        return InstanceStatus(instance_id=self.spec.instance_id, state=self.state, pid=pid, restarts=self.restarts,
                              exit_code=self.exit_code, epoch=self.epoch, reason=self.reason)


class Supervisor:
    def __init__(self, node: str, home: Path, publish: Publish, policy: AgentPolicy | None = None,
                 own: list[InstanceSpec] = ()) -> None:
        self.node = node
        self.logs = home / "instances"
        self.publish = publish
        self.instances: dict[str, Instance] = {}
        self.policy = policy or AgentPolicy()
        # Specs the agent built itself (joining Ray): exempt from the policy, given the agent's environment.
        self.own = {s.instance_id: s for s in own}

    def statuses(self) -> list[InstanceStatus]:
        return [inst.status() for _, inst in sorted(self.instances.items())]

    async def reconcile(self, desired: list[InstanceSpec], epoch: int) -> None:
        """Make what runs here match `desired`: stop the rest (fencing), start what is missing."""
        wanted = {s.instance_id: s for s in desired}
        # Every stop at once: one instance that ignores SIGTERM costs one grace period, not one each.
        await self._stop_many([i for i, inst in self.instances.items() if wanted.get(i) != inst.spec])
        for instance_id, spec in wanted.items():
            current = self.instances.get(instance_id)
            if current is None:
                self.instances[instance_id] = inst = Instance(spec=spec, epoch=epoch)
                await self._start(inst)
            else:
                current.epoch = epoch

    async def _start(self, inst: Instance) -> None:
        spec = inst.spec
        if not spec.command:
            inst.state = "reserved"  # placement only: nothing to run on this node
            return
        own = self.own.get(spec.instance_id) == spec
        refusal = None if own else self.policy.check(spec)
        if refusal:
            inst.state, inst.reason = "refused", refusal
            log.warning("instance refused by the node's policy", extra={"instance": spec.instance_id,
                                                                        "reason": refusal})
            return
        argv, env, user = self._launch(spec, own, inst.epoch)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            inst.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=spec.cwd or None, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_agent, user=user)
        except OSError as exc:
            log.warning("instance failed to start", extra={"instance": spec.instance_id, "error": str(exc)})
            inst.exit_code = 127
            await self._exited(inst)
            return
        inst.state = "running"
        log.info("instance started", extra={"instance": spec.instance_id, "pid": inst.proc.pid})
        inst.tasks = [asyncio.create_task(self._pump(inst)), asyncio.create_task(self._wait(inst))]

    def _launch(self, spec: InstanceSpec, own: bool, epoch: int) -> tuple[list[str], dict[str, str], str | None]:
        """(argv, environment, user) of an allowed instance; the agent's own get the agent's environment.

        MAGI_EPOCH is the placement epoch of the assignment that started it: an instance that writes
        somewhere can stamp its writes with it, so whoever reads them can refuse a fenced-off copy's."""
        if own:
            env = {**os.environ, **spec.env, "MAGI_INSTANCE_ID": spec.instance_id, "MAGI_NODE_NAME": self.node,
                   "MAGI_EPOCH": str(epoch)}
            return spec.command, env, None
        # Exec the very file the policy approved, not whatever PATH finds at exec time.
        argv = [self.policy.program(spec), *spec.command[1:]]
        return argv, self.policy.environment(spec, self.node, epoch), self.policy.run_as or None

    async def _pump(self, inst: Instance) -> None:
        subject = f"magi.node.{self.node}.logs.{inst.spec.instance_id}"
        with (self.logs / f"{inst.spec.instance_id}.log").open("ab") as out:
            async for line in inst.proc.stdout:
                out.write(line)
                out.flush()
                try:
                    await self.publish(subject, line.rstrip(b"\n"), {LOG_OFFSET_HEADER: str(out.tell())})
                except Exception:  # the bus being away must not block the instance's output
                    pass

    async def _wait(self, inst: Instance) -> None:
        inst.exit_code = await inst.proc.wait()
        if not inst.stopping:
            await self._exited(inst)

    async def _exited(self, inst: Instance) -> None:
        spec, now = inst.spec, time.monotonic()
        failed = inst.exit_code != 0
        log.info("instance exited", extra={"instance": spec.instance_id, "exit_code": inst.exit_code})
        if spec.restart == "never" or (spec.restart == "on-failure" and not failed):
            inst.state = "exited" if not failed else "failed"
            return
        inst.failures = [t for t in inst.failures if now - t < CRASHLOOP_WINDOW_S] + [now]
        if len(inst.failures) >= CRASHLOOP_FAILURES:
            inst.state = "crashloop"
            log.warning("instance crash-looping; not restarting", extra={"instance": spec.instance_id})
            return
        inst.state = "backoff"
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (len(inst.failures) - 1))
        await asyncio.sleep(delay)
        if not inst.stopping and self.instances.get(spec.instance_id) is inst:
            inst.restarts += 1
            await self._start(inst)

    async def stop(self, instance_id: str) -> None:
        inst = self.instances.pop(instance_id, None)
        if inst is None:
            return
        inst.stopping = True
        proc = inst.proc
        if proc is not None and proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except asyncio.TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        for task in inst.tasks:
            task.cancel()
        log.info("instance stopped", extra={"instance": instance_id})

    async def stop_all(self) -> None:
        await self._stop_many(list(self.instances))

    async def _stop_many(self, instance_ids: list[str]) -> None:
        await asyncio.gather(*(self.stop(i) for i in instance_ids))


def read_tail(path: Path, lines: int, max_bytes: int) -> tuple[list[str], int]:
    """The last `lines` complete lines of a log (at most `max_bytes` of them) and the offset they end at.

    A line still being written (no newline yet) is left out, and the offset ends before it: the follower
    gets it live. Output is decoded leniently: an instance may print any bytes.
    """
    with path.open("rb") as log_file:
        end = os.fstat(log_file.fileno()).st_size
        start = max(0, end - max_bytes)
        log_file.seek(start)
        data = log_file.read(end - start)
    complete = data[:data.rfind(b"\n") + 1]
    offset = start + len(complete)
    kept = complete.splitlines()
    if start > 0 and kept:
        kept = kept[1:]  # the first line read may be the end of a longer one
    kept = kept[-lines:] if lines else []
    return [line.decode(errors="replace") for line in kept], offset


_PR_SET_PDEATHSIG = 1


def _die_with_agent() -> None:
    """In the child before exec: if the agent dies (kill -9 included), the kernel kills the instance.

    Otherwise a dead agent would leave an orphan running while the scheduler starts a second copy
    elsewhere. (Under systemd, KillMode=control-group does the same for the whole unit.)
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the instance leads its own session: its children go too
    except ProcessLookupError:
        pass
