import socket

import msgspec
import pytest

from magi import stack
from services.inference.catalog import Catalog, default_catalog, load_catalog, resolve_source
from shared.config import load_settings
from shared.errors import BadRequest, NotFound, StackError

pytestmark = pytest.mark.unit


def test_default_model_comes_from_the_installed_wheel():
    path = resolve_source(default_catalog().models[0].source)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_missing_sources_are_not_found():
    with pytest.raises(NotFound):
        resolve_source("/nonexistent/model.gguf")
    with pytest.raises(NotFound):
        resolve_source("no_such_model_package_xyz")


def test_catalogue_file_rejects_unknown_keys(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: m\n    replicas: 1\n    colour: blue\n")
    with pytest.raises(BadRequest) as info:
        load_catalog(str(path))
    assert "colour" in info.value.message


def test_settings_come_from_the_environment():
    settings = load_settings({"MAGI_NATS_URL": "nats://127.0.0.1:5000", "MAGI_MAX_PAYLOAD": "1000"})
    assert settings.nats_url == "nats://127.0.0.1:5000" and settings.max_payload == 1000


def test_bad_setting_names_the_variable():
    with pytest.raises(BadRequest) as info:
        load_settings({"MAGI_HEARTBEAT_S": "soon"})
    assert "MAGI_HEARTBEAT_S" in info.value.message


def test_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = stack.StackConfig(home=tmp_path, nats_port=port)
        with pytest.raises(StackError) as info:
            stack.start_nats(cfg)
    assert str(port) in info.value.message and "MAGI_NATS_URL" in info.value.message


def test_vllm_models_need_a_local_folder(tmp_path):
    from services.inference.catalog import ModelSpec, resolve_model
    from shared.errors import NotFound

    assert resolve_model(ModelSpec(name="big", backend="vllm", source=str(tmp_path))) == tmp_path
    with pytest.raises(NotFound) as err:
        resolve_model(ModelSpec(name="big", backend="vllm", source="meta-llama/Llama-3.1-8B"))
    assert err.value.field == "source"


def test_generation_replicas_split_the_cores_and_the_embedder_gets_up_to_two(monkeypatch):
    from services.inference.catalog import threads_for

    catalog = default_catalog()
    generate, embed = catalog.models
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert threads_for(generate, catalog) == 8 and threads_for(embed, catalog) == 2  # one batched replica
    two = Catalog(models=[msgspec.structs.replace(generate, replicas=2), embed])
    assert threads_for(two.models[0], two) == 4  # two generation replicas split the cores
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert threads_for(generate, catalog) == 1 and threads_for(embed, catalog) == 1
