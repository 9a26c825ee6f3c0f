"""A private inference stack for a benchmark that brings its own model catalogue."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import AsyncIterator

import yaml

from magi import stack
from magi.procs import free_port


@contextlib.asynccontextmanager
async def inference_only(catalogue: dict, progress, prefix: str) -> AsyncIterator:
    """NATS, Redis and the inference service serving `catalogue`, in a temporary home; yields an admin
    connection, and takes everything down afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        home = Path(tmp)
        (home / "models.yaml").write_text(yaml.safe_dump(catalogue))
        cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=("inference",),
                                extra_env={"MAGI_MODELS_FILE": str(home / "models.yaml")})
        state = await stack.up(cfg, progress)
        try:
            nc = await stack.connect_as(state.home, state.nats_url)
            try:
                yield nc
            finally:
                await nc.close()
        finally:
            stack.down(home, progress)
