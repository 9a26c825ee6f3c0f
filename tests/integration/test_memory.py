import pytest

from protos.memory import MemoryDoc, SearchReply, SearchRequest, UpsertReply, UpsertRequest
from shared import bus
from shared.errors import BadRequest

pytestmark = pytest.mark.integration

DOCS = ["Raft elects a leader to replicate a log.", "Sourdough needs a starter and patience.",
        "The scheduler puts jobs on nodes with free RAM."]


async def test_upsert_then_search_finds_the_closest_document(nc):
    docs = [MemoryDoc(text=t, namespace="mem-test") for t in DOCS]
    up = await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=docs), UpsertReply, timeout=60)
    assert up.count == 3 and len(set(up.ids)) == 3
    again = await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=docs), UpsertReply, timeout=60)
    assert again.ids == up.ids  # content-addressed: re-upserting does not duplicate
    found = await bus.request(nc, "magi.memory.search", SearchRequest(text=DOCS[1], namespace="mem-test", k=3),
                              SearchReply, timeout=60)
    assert [h.text for h in found.hits][0] == DOCS[1]
    assert len(found.hits) == 3 and found.hits[0].score >= found.hits[-1].score
    assert found.hits[0].score == pytest.approx(1.0, abs=1e-4)


async def test_namespaces_are_isolated(nc):
    await bus.request(nc, "magi.memory.upsert",
                      UpsertRequest(documents=[MemoryDoc(text="only in ns-a", namespace="ns-a")]), UpsertReply, timeout=60)
    found = await bus.request(nc, "magi.memory.search", SearchRequest(text="only in ns-a", namespace="ns-b"),
                              SearchReply, timeout=60)
    assert found.hits == []


async def test_search_by_embedding_checks_dimensions(nc):
    with pytest.raises(BadRequest) as info:
        await bus.request(nc, "magi.memory.search", SearchRequest(embedding=[0.1, 0.2]), SearchReply, timeout=10)
    assert info.value.field == "embedding"


async def test_search_needs_text_or_embedding(nc):
    with pytest.raises(BadRequest) as info:
        await bus.request(nc, "magi.memory.search", SearchRequest(), SearchReply, timeout=10)
    assert info.value.field == "text"


async def test_a_new_embedding_model_re_embeds_what_is_stored(magi_stack, nc):
    """Vectors from another model (another size here) are replaced, in one transaction, with the new one's."""
    import asyncpg

    from protos.infer import EmbedReply, EmbedRequest
    from services.memory.store import MemoryStore

    async def embed(texts):
        reply = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=60)
        return reply.vectors

    admin = await asyncpg.connect(magi_stack.pg_dsn)
    await admin.execute("DROP DATABASE IF EXISTS reembed_test")
    await admin.execute("CREATE DATABASE reembed_test")
    dsn = magi_stack.pg_dsn.replace("/postgres?", "/reembed_test?")
    try:
        old = await MemoryStore.open(dsn, 3, "toy-3d")
        await old.upsert([("d1", "default", DOCS[0], {}, [1.0, 0.0, 0.0]),
                          ("d2", "default", DOCS[1], {}, [0.0, 1.0, 0.0])])
        await old.close()
        with pytest.raises(Exception, match="re-embed"):  # without an embedder it refuses, naming both
            await MemoryStore.open(dsn, 384, "all-minilm-l6-v2")
        new = await MemoryStore.open(dsn, 384, "all-minilm-l6-v2", embed)
        hits = await new.search((await embed([DOCS[1]]))[0], "default", 2)
        assert [h.id for h in hits][0] == "d2" and hits[0].score == pytest.approx(1.0, abs=1e-4)
        await new.close()
        again = await MemoryStore.open(dsn, 384, "all-minilm-l6-v2")  # same model: nothing to do, no embedder needed
        await again.close()
    finally:
        await admin.execute("DROP DATABASE IF EXISTS reembed_test WITH (FORCE)")
        await admin.close()
