
import pytest

from protos.infer import EmbedReply, EmbedRequest, GenerateReply, GenerateRequest, ModelsReply
from shared import bus

pytestmark = pytest.mark.integration


async def test_models_lists_ready_replicas_with_their_node(nc):
    reply = await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)
    by_name = {m.name: m for m in reply.models}
    assert set(by_name) == {"smollm2-135m", "all-minilm-l6-v2"}
    replicas = by_name["smollm2-135m"].replicas
    # The default catalogue: one batched replica with every core (tests/integration/test_replica_failure.py
    # serves two replicas of its own).
    assert len(replicas) == 1 and all(r.state == "ready" and r.node == "testnode" for r in replicas)
    assert by_name["smollm2-135m"].max_batch == 10


async def test_generation_is_deterministic_at_temperature_zero(nc):
    request = GenerateRequest(prompt="Name a colour.", max_tokens=12, temperature=0.0, seed=1)
    # The batched replica keeps a prompt it has seen and reuses it, which may round a first run's answer
    # differently (README, Batched decoding): compare runs that all start from the kept prompt.
    await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=60)
    first, second = [await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=60) for _ in range(2)]
    assert first.text and first.text == second.text
    assert 0 < first.usage.completion_tokens <= 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


async def test_a_repeat_penalty_reaches_the_model(nc):
    """Greedy decoding of a prompt that invites a loop: the penalty changes which tokens come out."""
    prompt = "Repeat the word 'worthy' again and again: worthy, worthy, worthy,"
    plain, penalised = [
        await bus.request(nc, "magi.infer.generate", GenerateRequest(prompt=prompt, max_tokens=24, temperature=0.0,
                                                                     seed=1, repeat_penalty=p), GenerateReply,
                          timeout=60) for p in (1.0, 1.5)]
    assert plain.text != penalised.text
    assert plain.text.lower().count("worthy") > penalised.text.lower().count("worthy")


async def test_chat_messages_are_accepted(nc):
    request = {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}],
               "max_tokens": 8}
    reply = await bus.request(nc, "magi.infer.generate", request, GenerateReply, timeout=60)
    assert reply.model == "smollm2-135m" and reply.usage.completion_tokens > 0


async def test_embeddings_are_normalised_and_deterministic(nc):
    texts = ["schedulers place jobs", "schedulers place jobs", "a cat sat on the mat"]
    reply = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=30)
    assert reply.dim == 384 and reply.model == "all-minilm-l6-v2" and len(reply.vectors) == 3
    a, b, c = reply.vectors
    # Two copies in one batch sit at different places in llama.cpp's batch: equal up to float rounding.
    assert sum(x * y for x, y in zip(a, b)) > 0.99999 and sum(x * y for x, y in zip(a, c)) < 0.9
    assert abs(sum(x * x for x in a) - 1.0) < 1e-3
    again = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=30)
    assert again.vectors == reply.vectors  # the same request, the same vectors


async def test_replicas_are_placed_by_the_scheduler(nc):
    from protos.sched import AssignmentsReply

    reply = await bus.request(nc, "magi.sched.assignments.testnode", {"node": "testnode"}, AssignmentsReply, timeout=5)
    placed = {i.instance_id for i in reply.instances}
    assert {"replica-smollm2-135m-0", "replica-all-minilm-l6-v2-0"} <= placed


async def test_models_report_pids_and_queue(nc):
    reply = await bus.request(nc, "magi.infer.models", b"{}", ModelsReply, timeout=5)
    for model in reply.models:
        assert model.queued >= 0
        assert all(r.pid > 0 and r.restarts >= 0 for r in model.replicas)


async def test_the_embedder_is_all_minilm_l6_v2_by_its_reference_vectors(nc):
    """llama.cpp's vectors against an independent numpy forward pass over the same weights (the fixture),
    and the pair sentence-transformers documents for this model (cosine 0.7553)."""
    import json
    from pathlib import Path

    import numpy as np

    reference = json.loads((Path(__file__).parents[1] / "fixtures" / "minilm_reference.json").read_text())
    reply = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=reference["sentences"]), EmbedReply,
                              timeout=60)
    got, want = np.array(reply.vectors), np.array(reference["vectors"])
    cosines = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.99, dict(zip(reference["sentences"], cosines.round(4)))
    pair = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=["A man is eating food.",
                                                                         "A man is eating a piece of bread."]),
                             EmbedReply, timeout=60)
    assert float(np.dot(*pair.vectors)) == pytest.approx(0.7553, abs=0.002)
