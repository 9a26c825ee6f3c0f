from pathlib import Path

import pytest

from protos.export import schemas

pytestmark = pytest.mark.unit

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "protos" / "schema"


def test_exported_schemas_are_current():
    expected = schemas()
    on_disk = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
    stale = sorted(name for name in expected if on_disk.get(name) != expected[name])
    extra = sorted(set(on_disk) - set(expected))
    assert not stale and not extra, f"run `just protos`: stale {stale}, no longer exported {extra}"


def test_every_service_subject_has_a_schema():
    names = set(schemas())
    for subject in ("magi.mission.run", "magi.infer.generate", "magi.infer.models", "magi.memory.upsert",
                    "magi.memory.search", "magi.consensus.decide", "magi.sched.nodes", "magi.sched.report"):
        assert f"{subject}.json" in names
