"""Each service reports the time its request spent inside engines, so a mission can subtract it."""

import uuid

import pytest

from protos.consensus import ConsensusRecord, DecideRequest, GetRequest, Vote
from protos.infer import EmbedReply, EmbedRequest, GenerateReply, GenerateRequest, StreamChunk
from protos.memory import MemoryDoc, SearchReply, SearchRequest, UpsertReply, UpsertRequest
from shared import bus

pytestmark = pytest.mark.integration


async def test_a_generation_reports_its_time_inside_the_engine(nc):
    reply = await bus.request(nc, "magi.infer.generate", GenerateRequest(role="fast", prompt="Say hi.", max_tokens=4,
                                                                         temperature=0.0), GenerateReply, timeout=60)
    assert 0.0 < reply.engine_ms <= reply.latency_ms


async def test_a_streamed_generation_reports_its_engine_time_on_the_final_reply(nc):
    request = GenerateRequest(role="fast", prompt="Count to five.", max_tokens=8, temperature=0.0, stream=True)
    items = [item async for item in bus.stream_request(nc, "magi.infer.generate", request, StreamChunk,
                                                       GenerateReply, timeout=60)]
    final = items[-1]
    assert isinstance(final, GenerateReply) and len(items) > 1
    assert 0.0 < final.engine_ms <= final.latency_ms


async def test_an_embedding_reports_its_engine_time(nc):
    reply = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=["one", "two"]), EmbedReply, timeout=30)
    assert len(reply.vectors) == 2 and reply.engine_ms > 0.0


async def test_memory_reports_the_embedding_time_of_what_it_embedded(nc):
    namespace = f"engine-time-{uuid.uuid4().hex[:8]}"
    stored = await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=[
        MemoryDoc(text="Heartbeats tell the scheduler a node is alive.", namespace=namespace)]), UpsertReply,
        timeout=30)
    assert stored.embed_ms > 0.0
    by_text = await bus.request(nc, "magi.memory.search", SearchRequest(text="node alive", namespace=namespace),
                                SearchReply, timeout=30)
    assert by_text.hits and by_text.embed_ms > 0.0
    vector = (await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=["node alive"]), EmbedReply,
                                timeout=30)).vectors[0]
    by_vector = await bus.request(nc, "magi.memory.search", SearchRequest(embedding=vector, namespace=namespace),
                                  SearchReply, timeout=30)
    assert by_vector.hits and by_vector.embed_ms == 0.0  # nothing embedded: no engine time
    by_words = await bus.request(nc, "magi.memory.search", SearchRequest(text="node alive", namespace=namespace,
                                                                         mode="text"), SearchReply, timeout=30)
    assert by_words.embed_ms == 0.0


async def test_a_decision_reports_its_engine_time_and_the_stored_record_does_not(nc):
    votes = [Vote(clone_id="a", text="Paris is the capital of France."),
             Vote(clone_id="b", text="The French capital is Paris.")]
    mission_id = f"engine-time-{uuid.uuid4().hex[:8]}"
    record = await bus.request(nc, "magi.consensus.decide", DecideRequest(votes=votes, strategy="medoid",
                                                                          mission_id=mission_id, prompt="Capital?"),
                               ConsensusRecord, timeout=60)
    assert record.similarity == "embedding" and record.engine_ms > 0.0  # the answers' embeddings
    stored = await bus.request(nc, "magi.consensus.get", GetRequest(id=record.id), ConsensusRecord, timeout=10)
    assert stored.engine_ms == 0.0
    record.engine_ms = 0.0
    assert stored == record  # the reply is what was stored
