"""`magi validate-config` and `magi place` work with no service running."""

import json

import pytest

from magi.cli import main

pytestmark = pytest.mark.unit

CLUSTER = "deploy/examples/jetson_rpi.cluster.yaml"
HIVE = "deploy/examples/hive_cluster.instances.yaml"


def test_place_prints_the_seed_hive_placement(capsys):
    assert main(["place", "--config", CLUSTER, "--instances", HIVE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"placements": {"historian": "jetson", "critic": "jetson", "optimist": "jetson", "pessimist": "rpi1"},
                   "unplaced": {}}


def test_place_with_explicit_placements(capsys):
    assert main(["place", "--config", CLUSTER, "--instances", HIVE, "--json", "--placement", "pessimist:jetson"]) == 0
    assert json.loads(capsys.readouterr().out)["placements"]["pessimist"] == "jetson"


def test_bad_explicit_placement_syntax_is_a_clear_error(capsys):
    assert main(["place", "--config", CLUSTER, "--instances", HIVE, "--placement", "pessimist"]) == 2
    assert "INSTANCE:NODE" in capsys.readouterr().err


def test_validate_config_reports_every_problem_with_its_path(tmp_path, capsys):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster: {name: x}\nnodes:\n  - {name: a, ram_gb: 8}\n  - {name: b, ram_gb: lots, colour: red}\n"
                   "  - {name: c, ram_gb: 8, reserved_ram_gb: 9}\n")
    assert main(["validate-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "nodes[1].ram_gb: expected a number" in err and "nodes[1].colour: unknown key" in err
    assert main(["validate-config", "deploy/cluster.example.yaml"]) == 0


def test_semantic_problems_are_reported_too(tmp_path, capsys):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster: {name: x}\nnodes:\n  - {name: a, ram_gb: 8, reserved_ram_gb: 9}\n  - {name: a, ram_gb: 8}\n")
    assert main(["validate-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "nodes[0].reserved_ram_gb: must be less than ram_gb" in err and "nodes[1].name: duplicate 'a'" in err
