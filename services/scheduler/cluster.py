"""Cluster and instance files (the seed-002 shapes), validated with every problem's path.

Unknown keys are errors in these files (unlike wire messages): a typo in a config file must not be
silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from protos.sched import Gb, InstanceSpec, Name
from shared.errors import BadRequest, field_of_validation_error

NodeType = Literal["jetson_orin", "raspberry_pi", "host", "generic"]


class NodeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    host: str = "127.0.0.1"
    type: NodeType = "generic"
    ram_gb: Annotated[float, msgspec.Meta(gt=0)]
    gpu: bool = False
    gpu_memory_gb: Gb = 0.0
    # GPUs on the node (the heartbeat's list): instances that hold GPUs (InstanceSpec.gpus) take no more than
    # these. 0: not known, not limited (GPU memory still is).
    gpu_count: Annotated[int, msgspec.Meta(ge=0)] = 0
    cpu_cores: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_instances: Annotated[int, msgspec.Meta(ge=0)] = 4
    reserved_ram_gb: Gb = 0.0
    labels: dict[str, str] = {}
    # The node's model cache, from its heartbeat: the digests it holds, and the GB a model it lacks may take
    # (None: not reported, nothing is refused for disk).
    models: list[str] = []
    model_room_gb: Gb | None = None
    # Seed 002's SSH runner fields: accepted so its cluster files load as written, but unused, since the
    # node's agent starts instances itself (`unused_ssh_fields` lets tools say so).
    ssh_user: str | None = None
    ssh_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    ssh_key_path: str | None = None
    remote_work_dir: str | None = None


SSH_FIELDS = ("ssh_user", "ssh_port", "ssh_key_path", "remote_work_dir")


def unused_ssh_fields(node: NodeConfig) -> list[str]:
    return [f for f in SSH_FIELDS if getattr(node, f) is not None]


class ClusterMeta(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str = ""


class ScoreWeights(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The soft score's weights (seed 002's defaults; they sum to 100)."""

    resource_efficiency: Gb = 30.0
    load_balancing: Gb = 20.0
    gpu_preference: Gb = 15.0
    affinity: Gb = 25.0
    preferred_node: Gb = 10.0


# The exact solver's wall-clock budget per batch (it runs only when greedy leaves something unplaced):
# small enough that the scheduler stays responsive, enough for CP-SAT on a few dozen instances. The same
# default as shared.config's sched_place_budget_s (imports point one way, so it is written twice).
DEFAULT_BUDGET_S = 0.25


class PlacementConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    weights: ScoreWeights = msgspec.field(default_factory=ScoreWeights)
    # The exact solver's budget per batch; 0: greedy alone; unset: MAGI_SCHED_PLACE_BUDGET_S (0.25 s).
    budget_s: Annotated[float, msgspec.Meta(ge=0, le=60)] | None = None


class ClusterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    cluster: ClusterMeta
    nodes: Annotated[list[NodeConfig], msgspec.Meta(min_length=1)]
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)


class InstanceSpecFile(InstanceSpec, kw_only=True, forbid_unknown_fields=True):
    """An instance as written in an INSTANCES.yaml file: same fields as the wire contract, typos refused."""


class InstancesFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    instances: list[InstanceSpecFile]


_NESTED = {"nodes": NodeConfig, "instances": InstanceSpecFile, "cluster": ClusterMeta, "placement": PlacementConfig,
           "weights": ScoreWeights}


def _problems(node: Any, typ: type, path: str = "") -> list[str]:
    """Every problem, not just msgspec's first: each key of each mapping is checked on its own."""
    try:
        msgspec.convert(node, typ)
        return []
    except msgspec.ValidationError as exc:
        first = str(exc)
    if not isinstance(node, dict) or not hasattr(typ, "__struct_fields__"):
        return [_with_path(first, path)]
    problems: list[str] = []
    fields = {f.encode_name: f for f in msgspec.structs.fields(typ)}
    for key in node:
        if key not in fields:
            problems.append(f"{path}{key}: unknown key")
    for name, info in fields.items():
        if name not in node:
            if info.required:
                problems.append(f"{path}{name}: required key is missing")
            continue
        sub_type = _NESTED.get(name)
        if sub_type is not None and isinstance(node[name], list):
            for i, item in enumerate(node[name]):
                problems += _problems(item, sub_type, f"{path}{name}[{i}].")
        elif sub_type is not None and isinstance(node[name], dict):
            problems += _problems(node[name], sub_type, f"{path}{name}.")
        if sub_type is None or not problems:
            try:
                msgspec.convert(node[name], info.type)
            except msgspec.ValidationError as exc:
                problems.append(_with_path(str(exc), f"{path}{name}"))
    return problems or [_with_path(first, path)]


_KINDS = {"`float`": "a number", "`int`": "an integer", "`str`": "a string", "`bool`": "true or false",
          "`array`": "a list", "`object`": "a mapping", "`null`": "nothing"}
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")


def _with_path(message: str, prefix: str) -> str:
    """msgspec's message, reworded for a person editing YAML: `nodes[2].ram_gb: expected a number`."""
    field = field_of_validation_error(message)
    text = message.split(" - at `")[0]
    unknown = _UNKNOWN.match(text)
    if unknown:
        field, text = (f"{field}." if field else "") + unknown.group("key"), "unknown key"
    elif text.startswith("Object missing required field"):
        text = "required key is missing"
    for kind, words in _KINDS.items():
        text = text.replace(kind, words)
    if prefix and not prefix.endswith(".") and field:
        prefix += "" if field.startswith("[") else "."
    location = f"{prefix}{field}" if field else prefix.rstrip(".") or "$"
    return f"{location}: {text[0].lower()}{text[1:]}"


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read: {exc.strerror}", field="path") from None
    except yaml.YAMLError as exc:
        raise BadRequest(f"{path}: not valid YAML: {exc}", field="path") from None


def validate(raw: Any, typ: type) -> tuple[Any, list[str]]:
    problems = _problems(raw, typ)
    if problems:
        return None, problems
    parsed = msgspec.convert(raw, typ)
    return parsed, _semantic_problems(parsed)


def _semantic_problems(parsed: Any) -> list[str]:
    problems: list[str] = []
    items = parsed.nodes if isinstance(parsed, ClusterConfig) else parsed.instances
    key = "name" if isinstance(parsed, ClusterConfig) else "instance_id"
    seen: set[str] = set()
    for i, item in enumerate(items):
        value = getattr(item, key)
        if value in seen:
            problems.append(f"{'nodes' if key == 'name' else 'instances'}[{i}].{key}: duplicate {value!r}")
        seen.add(value)
        if isinstance(item, NodeConfig):
            if item.reserved_ram_gb >= item.ram_gb:
                problems.append(f"nodes[{i}].reserved_ram_gb: must be less than ram_gb ({item.ram_gb})")
            if item.gpu_memory_gb and not item.gpu:
                problems.append(f"nodes[{i}].gpu_memory_gb: set but gpu is false")
            if item.gpu_count and not item.gpu:
                problems.append(f"nodes[{i}].gpu_count: set but gpu is false")
    return problems


def load(path: str | Path, typ: type) -> Any:
    parsed, problems = validate(_load_yaml(Path(path)), typ)
    if problems:
        raise BadRequest(f"{path}: " + "; ".join(problems), field=problems[0].split(":")[0])
    return parsed


def load_cluster(path: str | Path) -> ClusterConfig:
    return load(path, ClusterConfig)


def load_instances(path: str | Path) -> list[InstanceSpec]:
    return load(path, InstancesFile).instances
