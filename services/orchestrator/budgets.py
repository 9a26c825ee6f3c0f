"""Per-role generation budgets: seed 000's (2000 tokens for deep analysis, 200 for variations), scaled
to the model that serves the role.

The seed's budgets were set for 128k- and 32k-context models. On a small model they would not fit
(SmolLM2-135M has a 2048-token window that the prompt shares), so a role's budget is the seed's or a
share of its model's context window, whichever is smaller: a quarter for deep analysis, a sixteenth for a
variation (2048 → 512 and 128; 32k → 2000 and 200). A mission's own `max_tokens` / `deep_max_tokens`
always win.
"""

from __future__ import annotations

import logging
import time

from nats.aio.client import Client

from protos.common import Empty
from protos.infer import ModelsReply
from shared import bus
from shared.errors import MagiError

log = logging.getLogger("magi.orchestrator.budgets")

SEED_BUDGET = {"heavy": 2000, "fast": 200}
CONTEXT_SHARE = {"heavy": 4, "fast": 16}  # at most 1/4 (deep) or 1/16 (a variation) of the window
MIN_BUDGET = 32
ASSUMED_N_CTX = 2048  # when no model answers: the smallest window in the default catalogue
REFRESH_S = 60.0


def role_budget(role: str, n_ctx: int) -> int:
    return max(MIN_BUDGET, min(SEED_BUDGET[role], n_ctx // CONTEXT_SHARE[role]))


def budgets_for(models: ModelsReply | None) -> dict[str, int]:
    """Each role's budget from the smallest context window among the models serving it."""
    windows: dict[str, int] = {}
    for model in models.models if models else []:
        for role in model.roles:
            if role in SEED_BUDGET:
                windows[role] = min(windows.get(role, model.n_ctx), model.n_ctx)
    return {role: role_budget(role, windows.get(role, ASSUMED_N_CTX)) for role in SEED_BUDGET}


class Budgets:
    """The catalogue's windows, asked of `magi.infer.models` at most once a minute."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._cached: dict[str, int] | None = None
        self._at = 0.0
        self.outage = bus.Outage("the model list (magi.infer.models); using default budgets", log)

    async def get(self) -> dict[str, int]:
        if self._cached is not None and time.monotonic() - self._at < REFRESH_S:
            return self._cached
        try:
            models = await bus.request(self.nc, "magi.infer.models", Empty(), ModelsReply, timeout=5.0)
        except MagiError as exc:
            self.outage.failed(exc)
            return self._cached or budgets_for(None)
        self.outage.ended()
        self._cached, self._at = budgets_for(models), time.monotonic()
        return self._cached
