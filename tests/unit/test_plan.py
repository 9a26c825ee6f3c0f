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


def test_deep_and_fast_clones_get_their_own_budgets():
    mission = MissionRequest(prompt="Why?", needs_deep_analysis=True, variations=["briefly"], max_tokens=200,
                             deep_max_tokens=2000)  # seed 000's figures
    assert [(t.role, t.max_tokens) for t in plan_clones(mission, [])] == [("heavy", 2000), ("fast", 200)]
    same = MissionRequest(prompt="Why?", needs_deep_analysis=True, max_tokens=64)
    assert [t.max_tokens for t in plan_clones(same, [])] == [64]  # no deep budget given: max_tokens


def test_variations_as_prompts_are_asked_as_they_are_with_the_shared_context():
    hit = SearchHit(id="1", text="Melchior has 2 GPUs.", score=0.9, namespace="default")
    mission = MissionRequest(prompt="GPU inventory", variations=["How many GPUs has Melchior?"],
                             variations_mode="prompt")
    [task] = plan_clones(mission, [hit])
    assert task.prompt.endswith("How many GPUs has Melchior?") and "Melchior has 2 GPUs." in task.prompt
    assert "Answer How many" not in task.prompt


def test_without_budgets_each_role_gets_its_default_scaled_to_the_model():
    from protos.infer import ModelInfo, ModelsReply
    from services.orchestrator.budgets import budgets_for, role_budget

    small = ModelInfo(name="s", backend="llama.cpp", roles=["heavy", "fast"], source="x", n_ctx=2048, threads=1)
    big = ModelInfo(name="b", backend="vllm", roles=["heavy"], source="y", n_ctx=131072, threads=1)
    assert budgets_for(ModelsReply(models=[small])) == {"heavy": 512, "fast": 128}
    assert budgets_for(ModelsReply(models=[big])) == {"heavy": 2000, "fast": 128}  # fast: assumed 2048 window
    assert budgets_for(ModelsReply(models=[big, small]))["heavy"] == 512  # the smallest window serving the role
    assert role_budget("fast", 32768) == 200 and role_budget("fast", 256) == 32
    mission = MissionRequest(prompt="Why?", needs_deep_analysis=True, variations=["briefly"])
    tasks = plan_clones(mission, [], budgets_for(ModelsReply(models=[big])))
    assert [(t.role, t.max_tokens) for t in tasks] == [("heavy", 2000), ("fast", 128)]
