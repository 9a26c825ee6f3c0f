"""Bus roles, credentials, the agent's instance policy and cluster material, without servers."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from magi.clusterinit import make_plan
from protos.sched import InstanceSpec
from services.agent.policy import AgentPolicy, load_policy
from services.agent.service import plausible_epoch
from services.scheduler.cluster import ClusterConfig, NodeConfig, unused_ssh_fields
from shared import natsauth, roles
from shared.config import Settings
from shared.errors import BadRequest

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_permissions_table_is_current():
    assert roles.markdown_table() in README.read_text(), "paste shared.roles.markdown_table() into the README"


def test_an_agent_may_publish_only_for_its_own_node():
    perms = roles.permissions("agent-rpi1")
    assert perms.pub_allow[:2] == ["magi.node.rpi1.>", "magi.sched.assignments.rpi1"]
    # The rest reads the model store (to fetch models for its node's replicas), which it can never write.
    assert all("OBJ_magi-models" in s or s == "$JS.API.STREAM.NAMES" for s in perms.pub_allow[2:])
    assert not any(s.startswith("$O.") for s in perms.pub_allow)
    assert all("rpi1" in s or s.startswith("$SRV") for s in perms.sub_allow)
    with pytest.raises(ValueError):
        roles.permissions("agent-a.b")
    with pytest.raises(ValueError):
        roles.permissions("root")


def test_only_the_scheduler_may_serve_scheduler_subjects():
    for identity, perms in roles.ROLE_PERMISSIONS.items():
        serves = any(s in ("magi.sched.>", ">") for s in perms.sub_allow) and not (
            {"magi.>", "magi.sched.>"} & set(perms.sub_deny))
        assert serves == (identity == "scheduler"), identity
    assert {"magi.node.*.heartbeat", "magi.node.*.logs.>"} <= set(roles.permissions("admin").pub_deny)


def test_clients_and_services_with_free_outputs_never_reach_control_subjects():
    client = roles.permissions("client")
    assert not {"magi.sched.place", "magi.sched.drain", "magi.sched.release"} & set(client.pub_allow)
    assert {"magi.>", "_MAGI.>", "$SRV.>"} <= set(client.sub_deny)
    for identity in ("inference", "orchestrator"):
        deny = roles.permissions(identity).pub_deny
        assert {"$SYS.>", "_MAGI.>"} <= set(deny), identity
    assert "magi.node.>" in roles.permissions("orchestrator").pub_deny
    # Inference asks a node's agent to fetch a model, and nothing else of a node; it never writes a model.
    assert {"magi.node.*.*", "magi.node.*.logs.>", "magi.node.*.*.*.>", "$O.>"} <= set(
        roles.permissions("inference").pub_deny)
    assert "$JS.API.STREAM.DELETE.>" in roles.permissions("orchestrator").pub_deny


def test_a_role_with_nothing_to_publish_gets_an_explicit_deny():
    # An empty allow list would mean "everything" to nats-server.
    assert roles.Permissions(sub_allow=["magi.x.>"]).nats_block()["publish"] == {"deny": [">"]}
    assert roles.permissions("consensus").nats_block()["publish"] == {"allow": ["magi.infer.embed", "magi.infer.generate"]}


@pytest.mark.parametrize("subject,ok", [("test.tokens.one", True), ("_INBOX.abc.1", True), ("magi.sched.place", False),
                                        ("$JS.API.STREAM.DELETE.X", False), ("_MAGI.agent-x.y", False),
                                        ("a..b", False), ("a.*", False), ("a.>", False)])
def test_output_subjects(subject, ok):
    assert (roles.check_output_subject(subject) is None) == ok


def test_seeds_are_private_and_stable(tmp_path):
    key = natsauth.ensure_seed(tmp_path, "client")
    assert key.startswith("U") and natsauth.ensure_seed(tmp_path, "client") == key
    assert stat.S_IMODE((tmp_path / "client.nk").stat().st_mode) == 0o600
    block = natsauth.authorization_block({"client": key})
    parsed = json.loads(block.removeprefix("authorization: "))
    assert parsed["users"][0]["nkey"] == key and "allow_responses" not in parsed["users"][0]["permissions"]


def test_connect_options_find_the_identitys_seed_and_ca(tmp_path):
    settings = Settings(home=str(tmp_path))
    assert natsauth.connect_options(settings, "admin") == {"inbox_prefix": "_INBOX"}
    natsauth.ensure_seed(natsauth.secrets_dir(tmp_path), "scheduler")
    options = natsauth.connect_options(settings, "scheduler")
    assert options["nkeys_seed"].endswith("scheduler.nk") and options["inbox_prefix"] == "_MAGI.scheduler"
    explicit = natsauth.connect_options(Settings(home=str(tmp_path), nats_creds="/run/creds/nats.nk"), "scheduler")
    assert explicit["nkeys_seed"] == "/run/creds/nats.nk"


def test_epochs_that_jump_implausibly_are_refused():
    assert plausible_epoch(0, 5_000_000) and plausible_epoch(10, 11)
    assert not plausible_epoch(10, 10 + 1_000_001) and not plausible_epoch(0, 2**60)


def _spec(command, env=None):
    return InstanceSpec(instance_id="i", ram_gb=0.1, command=command, env=env or {})


def test_policy_allows_listed_programs_through_symlinks(tmp_path):
    link = tmp_path / "py"
    link.symlink_to(sys.executable)
    policy = AgentPolicy(programs=[str(link)], env=["EXP_*"])
    assert policy.check(_spec([sys.executable, "-c", "pass"], {"EXP_SEED": "1"})) is None
    assert "LD_PRELOAD" in policy.check(_spec([sys.executable], {"LD_PRELOAD": "x"}))
    assert "is not allowed" in policy.check(_spec(["sh", "-c", "id"]))
    assert "not found" in policy.check(_spec(["no-such-program-here"]))
    assert "no agent policy file" in AgentPolicy().check(_spec([sys.executable]))


def test_policy_files_are_strict(tmp_path):
    good = tmp_path / "agent.yaml"
    good.write_text(f"programs: [{sys.executable}]\nenv: [CUDA_VISIBLE_DEVICES]\n")
    assert load_policy(str(good)).source == str(good)
    for text in ("programs: [/bin/true]\nprogram: [/bin/sh]\n", "run_as: no-such-user-here\n", "programs: 3\n"):
        good.write_text(text)
        with pytest.raises(BadRequest):
            load_policy(str(good))
    with pytest.raises(BadRequest, match="does not exist"):
        load_policy(str(tmp_path / "missing.yaml"))


def test_environment_holds_nothing_of_the_agents(monkeypatch):
    monkeypatch.setenv("MAGI_NATS_CREDS", "/secret/agent.nk")
    env = AgentPolicy(env=["EXP_*"]).environment(_spec(["x"], {"EXP_A": "1"}), "n1")
    assert env["EXP_A"] == "1" and env["MAGI_NODE_NAME"] == "n1" and "MAGI_NATS_CREDS" not in env
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "TZ", "EXP_A", "MAGI_INSTANCE_ID", "MAGI_NODE_NAME", "MAGI_EPOCH"}


def _cluster(*hosts: str) -> ClusterConfig:
    return ClusterConfig(cluster={"name": "c"}, nodes=[NodeConfig(name=f"n{i}", host=h, ram_gb=8.0)
                                                       for i, h in enumerate(hosts)])


def test_cluster_plans_need_real_addresses_and_one_or_three_nats_servers():
    assert make_plan(_cluster("10.0.0.1", "10.0.0.2")).head.name == "n0"
    with pytest.raises(ValueError, match="cluster network"):
        make_plan(_cluster("10.0.0.1", "0.0.0.0"))
    with pytest.raises(ValueError, match="3 for a cluster"):
        make_plan(_cluster("10.0.0.1", "10.0.0.2"), nats=["n0", "n1"])


def test_seed_002_ssh_fields_are_known_but_unused():
    node = NodeConfig(name="pi", ram_gb=8.0, ssh_user="pi", ssh_port=22)
    assert unused_ssh_fields(node) == ["ssh_user", "ssh_port"]
    assert unused_ssh_fields(NodeConfig(name="pi", ram_gb=8.0)) == []
