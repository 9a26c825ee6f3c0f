import json
import random

import pytest

from protos.memory import (
    DeleteReply,
    DeleteRequest,
    ListReply,
    ListRequest,
    MemoryDoc,
    SearchReply,
    SearchRequest,
    UpsertReply,
    UpsertRequest,
)
from shared import bus
from shared.errors import BadRequest

pytestmark = pytest.mark.integration

DOCS = ["Raft elects a leader to replicate a log.", "Sourdough needs a starter and patience.",
        "The scheduler puts jobs on nodes with free RAM."]


async def _upsert(nc, docs: list[MemoryDoc]) -> UpsertReply:
    return await bus.request(nc, "magi.memory.upsert", UpsertRequest(documents=docs), UpsertReply, timeout=120)


async def _search(nc, **kw) -> SearchReply:
    return await bus.request(nc, "magi.memory.search", SearchRequest(**kw), SearchReply, timeout=60)


async def _list(nc, **kw) -> ListReply:
    return await bus.request(nc, "magi.memory.list", ListRequest(**kw), ListReply, timeout=30)


async def _delete(nc, **kw) -> DeleteReply:
    return await bus.request(nc, "magi.memory.delete", DeleteRequest(**kw), DeleteReply, timeout=30)


async def test_upsert_then_search_finds_the_closest_document(nc):
    docs = [MemoryDoc(text=t, namespace="mem-test") for t in DOCS]
    up = await _upsert(nc, docs)
    assert up.count == 3 and len(set(up.ids)) == 3 and up.chunks == [1, 1, 1]
    again = await _upsert(nc, docs)
    assert again.ids == up.ids  # content-addressed: re-upserting does not duplicate
    found = await _search(nc, text=DOCS[1], namespace="mem-test", k=3, mode="vector")
    assert [h.text for h in found.hits][0] == DOCS[1] and found.mode == "vector"
    assert len(found.hits) == 3 and found.hits[0].score >= found.hits[-1].score
    assert found.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert found.hits[0].parent_id == found.hits[0].id and found.hits[0].chunk == 0
    hybrid = await _search(nc, text=DOCS[1], namespace="mem-test", k=3)  # the default mode
    assert hybrid.mode == "hybrid" and hybrid.hits[0].text == DOCS[1]
    assert hybrid.hits[0].vector_score == pytest.approx(1.0, abs=1e-4) and hybrid.hits[0].vector_rank == 1
    assert hybrid.hits[0].text_rank == 1  # every word of the question is in it
    assert [h.score for h in hybrid.hits] == sorted((h.score for h in hybrid.hits), reverse=True)


async def test_namespaces_are_isolated(nc):
    await _upsert(nc, [MemoryDoc(text="only in ns-a", namespace="ns-a")])
    for mode in ("vector", "text", "hybrid"):
        found = await _search(nc, text="only in ns-a", namespace="ns-b", mode=mode)
        assert found.hits == []


async def test_search_by_embedding_checks_dimensions(nc):
    with pytest.raises(BadRequest) as info:
        await _search(nc, embedding=[0.1, 0.2])
    assert info.value.field == "embedding"


async def test_search_needs_text_or_embedding(nc):
    with pytest.raises(BadRequest) as info:
        await _search(nc)
    assert info.value.field == "text"
    with pytest.raises(BadRequest) as info:  # full text needs words, an embedding will not do
        await _search(nc, embedding=[0.0] * 384, mode="text")
    assert info.value.field == "text"


MODES_NS = "mem-modes"
PORT_DOC = "The backup box answers on port 8473 with its admin console."
BREAD_DOC = "Sourdough needs a starter and patience."
OTHERS = ["Raft elects a leader to replicate a log.", "The scheduler puts jobs on nodes with free RAM.",
          "The garage door opener runs on a 12 volt battery.", "Grafana dashboards show the power draw of the rack."]


async def test_text_vector_and_hybrid_modes(nc):
    await _upsert(nc, [MemoryDoc(id=f"m{i}", text=t, namespace=MODES_NS)
                       for i, t in enumerate([PORT_DOC, BREAD_DOC, *OTHERS])])
    keyword, paraphrase = "What is on port 8473?", "How do I bake naturally leavened loaves?"
    by_text = await _search(nc, text=keyword, namespace=MODES_NS, mode="text")
    assert by_text.mode == "text" and by_text.hits[0].id == "m0"
    assert by_text.hits[0].text_score > 0 and by_text.hits[0].vector_score is None
    # no word in common with the sourdough document: full text cannot find it, the embedding can
    assert "m1" not in [h.id for h in (await _search(nc, text=paraphrase, namespace=MODES_NS, mode="text")).hits]
    by_vector = await _search(nc, text=paraphrase, namespace=MODES_NS, mode="vector")
    assert by_vector.hits[0].id == "m1"
    for question, expected in ((keyword, "m0"), (paraphrase, "m1")):
        hybrid = await _search(nc, text=question, namespace=MODES_NS, k=3)
        assert hybrid.hits[0].id == expected, (question, [(h.id, h.score) for h in hybrid.hits])


async def test_unknown_mode_and_bad_filter_are_refused(nc):
    for payload, field in ((b'{"text": "x", "mode": "fuzzy"}', "mode"), (b'{"text": "x", "filter": "host=a"}', "filter"),
                           (b'{"text": "x", "filter": [1]}', "filter")):
        msg = await nc.request("magi.memory.search", payload, timeout=30)
        assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == "400", payload
        assert json.loads(msg.data)["error"]["field"] == field


async def test_metadata_filter_on_search_list_and_delete(nc):
    ns = "mem-meta"
    docs = [MemoryDoc(id="gpu-m", text="Melchior carries two RTX 3090 cards.", namespace=ns,
                      metadata={"host": "melchior", "kind": "hardware", "tags": ["gpu", "nvlink"]}),
            MemoryDoc(id="gpu-b", text="Balthazar has an RTX A4000 card.", namespace=ns,
                      metadata={"host": "balthazar", "kind": "hardware", "tags": ["gpu"]}),
            MemoryDoc(id="svc-m", text="Melchior runs the llama.cpp server on port 8080.", namespace=ns,
                      metadata={"host": "melchior", "kind": "service"})]
    await _upsert(nc, docs)
    for mode in ("vector", "text", "hybrid"):
        found = await _search(nc, text="Which RTX card is in the machine?", namespace=ns, k=5, mode=mode,
                              filter={"host": "melchior"})
        assert found.hits and {h.id for h in found.hits} <= {"gpu-m", "svc-m"}, mode
    found = await _search(nc, text="RTX card", namespace=ns, k=5, filter={"tags": ["nvlink"]})
    assert [h.id for h in found.hits] == ["gpu-m"] and found.hits[0].metadata["host"] == "melchior"
    listed = await _list(nc, namespace=ns, filter={"kind": "hardware"})
    assert [d.id for d in listed.documents] == ["gpu-b", "gpu-m"] and listed.next_cursor is None
    gone = await _delete(nc, namespace=ns, filter={"host": "melchior", "kind": "service"})
    assert gone.deleted == 1 and gone.chunks == 1
    assert [d.id for d in (await _list(nc, namespace=ns)).documents] == ["gpu-b", "gpu-m"]


def _long_text(words: int, needle: str, at: int) -> str:
    """Filler about the weather (seeded), with one sentence about something else `at` words in."""
    rng = random.Random(7)
    subjects = ["The morning", "The afternoon", "Tuesday", "The weekend", "The evening", "Last night"]
    verbs = ["brought", "promised", "ended with", "started with", "turned into"]
    things = ["light drizzle", "heavy clouds", "a cold wind from the north", "bright sunshine", "thick fog",
              "scattered showers", "a warm breeze", "hail for a few minutes", "a clear sky"]
    out: list[str] = []
    while len(out) < words:
        if at is not None and len(out) >= at:
            out += needle.split()
            at = None
        out += f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(things)}.".split()
    return " ".join(out)


async def test_a_long_document_is_chunked_and_found_by_a_sentence_deep_inside(nc):
    ns = "mem-long"
    needle = "The spare key for the garden shed hangs behind the boiler in cupboard K-774."
    text = _long_text(5000, needle, at=3100)
    assert len(text.split()) >= 5000 and needle in text
    up = await _upsert(nc, [MemoryDoc(id="diary", text=text, namespace=ns, metadata={"kind": "diary"}),
                            MemoryDoc(id="short", text="The shed holds the lawn mower.", namespace=ns)])
    assert up.ids == ["diary", "short"] and up.chunks[0] > 20 and up.chunks[1] == 1
    for mode in ("text", "hybrid"):
        found = await _search(nc, text="Where is the spare key for the garden shed?", namespace=ns, k=5, mode=mode)
        ids = [h.parent_id for h in found.hits]
        assert len(ids) == len(set(ids)), "two chunks of one document in the top k"
        assert ids[0] == "diary", mode
        assert found.hits[0].chunk > 0 and found.hits[0].id == f"diary#{found.hits[0].chunk}"
        assert found.hits[0].chunks == up.chunks[0] and "cupboard K-774" in found.hits[0].text, mode
    vector = await _search(nc, text="Where is the spare key for the garden shed?", namespace=ns, k=5, mode="vector")
    assert sorted(h.parent_id for h in vector.hits) == ["diary", "short"]  # one hit per document, never more
    listed = await _list(nc, namespace=ns)
    diary = next(d for d in listed.documents if d.id == "diary")
    assert diary.chunks == up.chunks[0] and diary.truncated and text.startswith(diary.text)

    # re-upserting the same id with a short text replaces every old chunk
    again = await _upsert(nc, [MemoryDoc(id="diary", text="Nothing happened today.", namespace=ns)])
    assert again.chunks == [1]
    found = await _search(nc, text="cupboard K-774", namespace=ns, k=5, mode="text")
    assert found.hits == []
    listed = await _list(nc, namespace=ns)
    assert {d.id: d.chunks for d in listed.documents} == {"diary": 1, "short": 1}
    assert not any(d.truncated for d in listed.documents)


async def test_list_pages_and_delete(nc):
    ns = "mem-pages"
    ids = (await _upsert(nc, [MemoryDoc(id=f"p{i}", text=f"Page test note number {i}.", namespace=ns,
                                        metadata={"n": i}) for i in range(7)])).ids
    seen, cursor, pages = [], None, 0
    while True:
        page = await _list(nc, namespace=ns, limit=3, cursor=cursor, max_chars=10)
        seen += [d.id for d in page.documents]
        assert all(len(d.text) <= 10 and d.truncated and d.created_at is not None for d in page.documents)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == sorted(ids) and pages == 3
    with pytest.raises(BadRequest) as info:  # neither ids nor a filter: that would be everything
        await _delete(nc, namespace=ns)
    assert info.value.field == "all"
    assert (await _delete(nc, namespace="mem-elsewhere", ids=["p0"])).deleted == 0  # ids are namespaced
    assert (await _delete(nc, namespace=ns, ids=["p0", "p1", "nope"])).deleted == 2
    assert (await _delete(nc, namespace=ns, filter={"n": 6})).deleted == 1
    assert (await _delete(nc, namespace=ns, all=True)).deleted == 4
    assert (await _list(nc, namespace=ns)).documents == []
    assert (await _search(nc, text="Page test note", namespace=ns, mode="text")).hits == []


async def test_a_new_embedding_model_re_embeds_what_is_stored(magi_stack, nc):
    """Vectors from another model (another size here) are replaced, in one transaction, with the new one's."""
    import psycopg

    from protos.infer import EmbedReply, EmbedRequest
    from services.memory.store import Document, MemoryStore

    async def embed(texts):
        reply = await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=60)
        return reply.vectors

    admin = await psycopg.AsyncConnection.connect(magi_stack.pg_dsn, autocommit=True)
    await admin.execute("DROP DATABASE IF EXISTS reembed_test")
    await admin.execute("CREATE DATABASE reembed_test")
    dsn = psycopg.conninfo.make_conninfo(magi_stack.pg_dsn, dbname="reembed_test")
    try:
        old = await MemoryStore.open(dsn, 3, "toy-3d")
        await old.upsert([Document("d1", "default", {}, [(DOCS[0], [1.0, 0.0, 0.0])]),
                          Document("d2", "default", {}, [(DOCS[1], [0.0, 1.0, 0.0])])])
        await old.close()
        with pytest.raises(Exception, match="re-embed"):  # without an embedder it refuses, naming both
            await MemoryStore.open(dsn, 384, "all-minilm-l6-v2")
        new = await MemoryStore.open(dsn, 384, "all-minilm-l6-v2", embed)
        hits = await new.search(namespace="default", k=2, vector=(await embed([DOCS[1]]))[0], mode="vector")
        assert [h.id for h in hits][0] == "d2" and hits[0].score == pytest.approx(1.0, abs=1e-4)
        await new.close()
        again = await MemoryStore.open(dsn, 384, "all-minilm-l6-v2")  # same model: nothing to do, no embedder needed
        await again.close()
    finally:
        await admin.execute("DROP DATABASE IF EXISTS reembed_test WITH (FORCE)")
        await admin.close()
