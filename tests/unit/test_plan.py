import pytest

from protos.memory import SearchHit
from protos.mission import MissionRequest
from services.orchestrator.plan import plan_clones

pytestmark = pytest.mark.unit


def test_deep_and_variations_make_one_clone_each():
    mission = MissionRequest(prompt="Why?", needs_deep_analysis=True, variations=["in one line", "as a haiku"])
    tasks = plan_clones(mission, [])
    assert [(t.clone_id, t.role, t.variation) for t in tasks] == [
        ("deep", "heavy", ""), ("var0", "fast", "in one line"), ("var1", "fast", "as a haiku")]
    assert tasks[2].prompt.endswith("Answer as a haiku.")


def test_a_bare_prompt_still_gets_one_deep_clone():
    tasks = plan_clones(MissionRequest(prompt="Why?"), [])
    assert [(t.clone_id, t.role) for t in tasks] == [("deep", "heavy")]


def test_variations_without_deep_analysis_skip_the_heavy_clone():
    tasks = plan_clones(MissionRequest(prompt="Why?", variations=["briefly"]), [])
    assert [t.role for t in tasks] == ["fast"]


def test_memory_hits_are_given_to_every_clone():
    hit = SearchHit(id="1", text="Schedulers place work.", score=0.9, namespace="default")
    tasks = plan_clones(MissionRequest(prompt="Why?", needs_deep_analysis=True, variations=["x"]), [hit])
    assert all("Schedulers place work." in t.prompt for t in tasks)
