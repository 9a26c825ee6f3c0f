"""What this node's operator lets instances run: a node-local file the scheduler cannot change.

The scheduler decides *where* an instance runs; only the node decides *whether* it may. An assigned
instance whose program is not listed, or that asks for an environment variable not listed, is refused:
reported in heartbeats as `refused` with the reason (so `magi report` shows it), never started.

```yaml
# /etc/magi/agent.yaml (MAGI_AGENT_POLICY), read when the agent starts
programs:              # what instances may execute, by absolute path (symlinks resolved)
  - /usr/bin/sleep
  - /opt/experiments/bin/run-experiment
env: [CUDA_VISIBLE_DEVICES, "EXP_*"]   # variable names (shell globs) an instance may set
run_as: magi-instance  # the user instances run as (the agent must be root to switch); empty: the agent's
```

Allowing an interpreter (python, sh) allows whatever it is told to run: list the scripts' own
entry points instead. Instances never inherit the agent's environment (its credentials): they get
PATH, LANG, TZ, their own MAGI_* variables (MAGI_INSTANCE_ID, MAGI_NODE_NAME, MAGI_EPOCH: the placement
epoch of the assignment that started them) and what the policy lets the spec set. Without a policy
file nothing assigned with a `command` runs. The agent's own components (joining Ray) are built by
the agent itself and are not subject to this file; model replicas and RPC shards are Ray actors,
not commands.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
import shutil
from pathlib import Path

import msgspec
import yaml

from protos.sched import InstanceSpec
from shared.errors import BadRequest

DEFAULT_PATHS = ("/etc/magi/agent.yaml",)
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PASSED_THROUGH = ("LANG", "LC_ALL", "TZ")


class AgentPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    programs: list[str] = []
    env: list[str] = []
    run_as: str = ""
    source: str = ""  # where it was read from (not a key of the file)

    def __post_init__(self) -> None:
        self.programs = [os.path.realpath(p) for p in self.programs]  # compared with resolved programs

    def program(self, spec: InstanceSpec) -> str | None:
        """The file `spec` would execute (absolute, symlinks resolved), found as its own PATH would find it."""
        return resolve_program(spec.command[0], spec.env.get("PATH", SAFE_PATH))

    def check(self, spec: InstanceSpec) -> str | None:
        """Why `spec` may not run here, or None."""
        program = self.program(spec)
        if program is None:
            return f"program {spec.command[0]!r} not found on this node"
        if program not in self.programs:
            where = self.source or "no agent policy file (MAGI_AGENT_POLICY)"
            return f"program {program} is not allowed by {where}"
        refused = sorted(k for k in spec.env if not any(fnmatch.fnmatchcase(k, g) for g in self.env))
        if refused:
            return f"environment variables not allowed by the node's policy: {', '.join(refused)}"
        return None

    def environment(self, spec: InstanceSpec, node: str, epoch: int = 0) -> dict[str, str]:
        """The instance's whole environment: nothing of the agent's but PATH and locale; MAGI_* last, so a
        spec cannot set them."""
        env = {k: os.environ[k] for k in _PASSED_THROUGH if k in os.environ}
        env["PATH"] = SAFE_PATH
        if self.run_as:
            env["HOME"] = pwd.getpwnam(self.run_as).pw_dir
        env.update(spec.env)
        env.update(MAGI_INSTANCE_ID=spec.instance_id, MAGI_NODE_NAME=node, MAGI_EPOCH=str(epoch))
        if spec.experiment_config_path:
            env["MAGI_EXPERIMENT_CONFIG"] = spec.experiment_config_path
        return env


def resolve_program(name: str, path: str) -> str | None:
    found = name if os.path.isabs(name) else shutil.which(name, path=path)
    if not found or not os.path.exists(found):
        return None
    return os.path.realpath(found)


def load_policy(path: str = "") -> AgentPolicy:
    """The policy at `path`, else the first default that exists, else the empty policy (nothing runs)."""
    candidates = [path] if path else list(DEFAULT_PATHS)
    for candidate in candidates:
        file = Path(candidate)
        if file.exists():
            return _parse(file)
        if path:
            raise BadRequest(f"agent policy {path} does not exist (MAGI_AGENT_POLICY)", field="agent_policy")
    return AgentPolicy()


def _parse(file: Path) -> AgentPolicy:
    try:
        policy = msgspec.convert(yaml.safe_load(file.read_text()) or {}, AgentPolicy)
    except (yaml.YAMLError, msgspec.ValidationError) as exc:
        raise BadRequest(f"agent policy {file}: {exc}", field="agent_policy") from None
    if policy.run_as:
        try:
            pwd.getpwnam(policy.run_as)
        except KeyError:
            raise BadRequest(f"agent policy {file}: run_as user {policy.run_as!r} does not exist",
                             field="agent_policy") from None
    policy.source = str(file)
    return policy
