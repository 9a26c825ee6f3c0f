"""Turning a mission into clone tasks: pure, so it is unit-tested without any server."""

from __future__ import annotations

from dataclasses import dataclass

from protos.memory import SearchHit
from protos.mission import MissionRequest
from services.orchestrator.budgets import budgets_for


@dataclass(frozen=True)
class CloneTask:
    clone_id: str
    role: str  # "heavy" for deep analysis, "fast" for variations
    variation: str
    prompt: str
    max_tokens: int = 96


def context_block(hits: list[SearchHit]) -> str:
    if not hits:
        return ""
    lines = "\n".join(f"- {h.text}" for h in hits)
    return f"Relevant notes:\n{lines}\n\n"


DEFAULT_BUDGETS = budgets_for(None)  # what a mission gets when no model names its window


def plan_clones(mission: MissionRequest, hits: list[SearchHit],
                budgets: dict[str, int] = DEFAULT_BUDGETS) -> list[CloneTask]:
    """Deep analysis on the heavy role, one fast clone per variation; with neither, one deep clone."""
    context = context_block(hits)
    tasks: list[CloneTask] = []
    deep_budget = mission.deep_max_tokens or mission.max_tokens or budgets["heavy"]
    fast_budget = mission.max_tokens or budgets["fast"]
    if mission.needs_deep_analysis or not mission.variations:
        tasks.append(CloneTask("deep", "heavy", "", f"{context}{mission.prompt}\nThink it through and answer.",
                               deep_budget))
    for i, variation in enumerate(mission.variations):
        asked = variation if mission.variations_mode == "prompt" else f"{mission.prompt}\nAnswer {variation}."
        tasks.append(CloneTask(f"var{i}", "fast", variation, f"{context}{asked}", fast_budget))
    return tasks
