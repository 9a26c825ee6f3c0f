"""The mission graph: missions, clones, votes and the consensus in SurrealDB, asked through
`magi.consensus.history` on the running stack, and inspected with SurrealQL on a store of our own."""

import uuid

import pytest

from magi import stack
from protos.consensus import ConsensusRecord, DecideRequest, GetRequest, HistoryReply, HistoryRequest, Synthesis, Vote
from services.consensus.history import rank_by_words
from services.consensus.store import ConsensusStore, record_key
from services.consensus.strategies import Decision
from shared import bus
from shared.errors import BadRequest

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:8]  # the session's stack is shared: our nodes and missions are named for this run
GPU, PI = f"gpu-{RUN}", f"pi-{RUN}"
FRANCE, SCHED, BREAD = f"france-{RUN}", f"sched-{RUN}", f"bread-{RUN}"

MISSIONS = {
    FRANCE: ("What is the capital city of France?", "majority", [
        Vote(clone_id="a", text="Paris is the capital of France.", node=GPU, model="smollm2-135m", role="deep",
             latency_ms=120.0),
        Vote(clone_id="b", text="The French capital is Paris.", node=PI, model="smollm2-135m", role="fast",
             latency_ms=340.0),
        Vote(clone_id="c", text="Bread needs flour, water and yeast.", node=GPU, model="tiny", role="fast",
             latency_ms=90.0)]),
    SCHED: ("Why does a cluster need a job scheduler?", "majority", [
        Vote(clone_id="d", text="Schedulers place jobs on nodes with free resources.", node=PI, latency_ms=200.0),
        Vote(clone_id="e", text="Red.", node=GPU, latency_ms=30.0),
        Vote(clone_id="f", text="", ok=False, node=GPU, latency_ms=5000.0)]),
    BREAD: ("How do I bake bread at home?", "longest", [
        Vote(clone_id="g", text="Mix flour, water, salt and yeast, let it rise, then bake it hot.", node=PI,
             latency_ms=75.0)]),
}


async def decide(nc, mission_id: str, votes: list[Vote] | None = None) -> ConsensusRecord:
    prompt, strategy, default_votes = MISSIONS[mission_id]
    request = DecideRequest(votes=votes or default_votes, strategy=strategy, mission_id=mission_id, prompt=prompt)
    return await bus.request(nc, "magi.consensus.decide", request, ConsensusRecord, timeout=30)


async def history(nc, **fields) -> HistoryReply:
    return await bus.request(nc, "magi.consensus.history", HistoryRequest(**fields), HistoryReply, timeout=30)


@pytest.fixture
async def decided(nc):
    """The three missions, decided once per test (deciding again overwrites: the graph is the same)."""
    return {mission_id: await decide(nc, mission_id) for mission_id in MISSIONS}


async def test_get_returns_the_prompt_and_each_votes_latency(nc, decided):
    stored = await bus.request(nc, "magi.consensus.get", GetRequest(mission_id=FRANCE), ConsensusRecord, timeout=10)
    assert stored.prompt == MISSIONS[FRANCE][0] and stored.copies == 1
    assert [(v.clone_id, v.node, v.latency_ms) for v in stored.votes] == [
        ("a", GPU, 120.0), ("b", PI, 340.0), ("c", GPU, 90.0)]
    assert stored.groups[0] == ["a", "b"]  # the paraphrases agree: the winning group the graph marks as chosen


async def test_history_by_a_paraphrased_prompt_ranks_the_matching_mission_first(nc, decided):
    reply = await history(nc, prompt="Which city is France's capital?", k=5)
    assert reply.similarity == "embedding"
    assert reply.similar and reply.similar[0].mission_id == FRANCE, reply.similar
    top = reply.similar[0]
    assert top.consensus_id == decided[FRANCE].id and top.answer == decided[FRANCE].answer
    assert top.prompt == MISSIONS[FRANCE][0] and top.strategy == "majority" and top.created_at
    ours = {m.mission_id: m.score for m in reply.similar if m.mission_id in MISSIONS}
    assert all(top.score > score for mission_id, score in ours.items() if mission_id != FRANCE)
    assert [m.score for m in reply.similar] == sorted((m.score for m in reply.similar), reverse=True)
    assert len((await history(nc, prompt="Which city is France's capital?", k=1)).similar) == 1


async def test_history_by_node_lists_exactly_its_votes_and_which_were_chosen(nc, decided):
    reply = await history(nc, node=GPU, k=50)
    assert reply.node == GPU and reply.similar == []
    rows = {(c.mission_id, c.clone_id): c for c in reply.contributions}
    assert set(rows) == {(FRANCE, "a"), (FRANCE, "c"), (SCHED, "e"), (SCHED, "f")}
    assert {key for key, c in rows.items() if c.chosen} == {(FRANCE, "a")}  # in the winning group; c, e were not
    assert not any(c.cited for c in rows.values())  # no synthesis here
    a, f = rows[(FRANCE, "a")], rows[(SCHED, "f")]
    assert (a.role, a.model, a.latency_ms, a.ok, a.text) == ("deep", "smollm2-135m", 120.0, True,
                                                             "Paris is the capital of France.")
    assert a.consensus_id == decided[FRANCE].id
    assert not f.ok and f.latency_ms == 5000.0
    s = reply.summary
    assert (s.votes, s.ok, s.chosen, s.cited) == (4, 3, 1, 0)
    assert s.mean_latency_ms == pytest.approx((120 + 90 + 30 + 5000) / 4, abs=0.1)

    pi = await history(nc, node=PI, k=50)
    assert {(c.mission_id, c.clone_id, c.chosen) for c in pi.contributions} == {
        (FRANCE, "b", True), (SCHED, "d", True), (BREAD, "g", True)}
    latest = await history(nc, node=PI, k=1)
    assert len(latest.contributions) == 1 and latest.summary.votes == 3  # k bounds the rows, not the summary


async def test_deciding_a_mission_again_replaces_its_clones_and_votes(nc, decided):
    # The same mission id with different votes: one mission, one set of clones, none left from before.
    again = [Vote(clone_id="a", text="Paris is the capital of France.", node=GPU, latency_ms=110.0),
             Vote(clone_id="b2", text="The French capital is Paris.", node=GPU, latency_ms=95.0)]
    record = await decide(nc, FRANCE, again)
    assert record.id == decided[FRANCE].id
    gpu = await history(nc, node=GPU, k=50)
    assert sorted(c.clone_id for c in gpu.contributions if c.mission_id == FRANCE) == ["a", "b2"]
    assert all(c.chosen for c in gpu.contributions if c.mission_id == FRANCE)
    pi = await history(nc, node=PI, k=50)
    assert FRANCE not in {c.mission_id for c in pi.contributions}  # b (on the pi) is gone with the old votes
    similar = await history(nc, prompt=MISSIONS[FRANCE][0], k=20)
    assert [m.mission_id for m in similar.similar].count(FRANCE) == 1
    stored = await bus.request(nc, "magi.consensus.get", GetRequest(mission_id=FRANCE), ConsensusRecord, timeout=10)
    assert stored.copies == 1 and [v.clone_id for v in stored.votes] == ["a", "b2"]
    await decide(nc, FRANCE)  # back as the other tests expect it


@pytest.mark.parametrize("fields, field", [({}, "prompt"), ({"prompt": "x", "node": "y"}, "node"),
                                           ({"prompt": "   "}, "prompt"), ({"node": "n", "k": 0}, "k"),
                                           ({"node": "n", "k": 201}, "k")])
async def test_history_asks_for_exactly_one_of_prompt_and_node(nc, fields, field):
    with pytest.raises(BadRequest) as info:
        await history(nc, **fields)
    assert info.value.field == field


async def test_an_unknown_node_has_no_votes(nc):
    reply = await history(nc, node=f"nowhere-{RUN}")
    assert reply.contributions == [] and reply.summary.votes == 0


def test_without_an_embedder_prompts_are_ranked_by_shared_words():
    prompts = [("m1", "how do I bake bread"), ("m2", "what is the capital of France"), ("m3", "GPU inventory")]
    assert rank_by_words("capital of France?", prompts, 5) == [("m2", pytest.approx(0.5))]
    assert [rid for rid, _ in rank_by_words("bread capital", prompts, 1)] == ["m1"]


# ---- the graph itself, read with SurrealQL (a store of our own: the service's embedded one is its own) ------

def vote(clone_id: str, node: str, text: str = "x", ok: bool = True, latency_ms: float = 10.0) -> Vote:
    return Vote(clone_id=clone_id, text=text, node=node, ok=ok, latency_ms=latency_ms, model="m", role="fast")


async def count(store: ConsensusStore, query: str, **variables) -> int:
    rows = await store.query(f"SELECT count() AS n FROM {query} GROUP ALL;", variables)
    return rows[0]["n"] if rows else 0


@pytest.fixture
async def store(tmp_path):
    store = await ConsensusStore.connect(f"surrealkv://{tmp_path / 'graph.db'}")
    try:
        yield store
    finally:
        await store.close()


async def test_the_graph_has_its_edges_and_a_retry_replaces_them(store):
    votes = [vote("a", "n1"), vote("b", "n2"), vote("c", "n1"), vote("d", "n1", text="", ok=False)]
    decision = Decision(answer="merged", winner="a", agreement=0.67, groups=[["a", "b"], ["c"]],
                        similarity="embedding")
    synthesis = Synthesis(inputs=["a", "b"], cited=["b"], model="smollm2-135m")
    record_id = await store.save(decision, votes, "synthesize", "graph-1", prompt="p?", prompt_vector=[1.0, 0.0],
                                 synthesis=synthesis)
    key = record_key("graph-1")
    rows = await store.query("SELECT ->spawned->clone->cast->vote.clone_id AS votes, ->decided->consensus AS decided,"
                             " ->spawned->clone->ran_on->node.name AS nodes FROM ONLY type::thing('mission', $key);",
                             {"key": key})
    assert sorted(rows["votes"]) == ["a", "b", "c", "d"]
    assert [str(r) for r in rows["decided"]] == [record_id]
    assert sorted(rows["nodes"]) == ["n1", "n1", "n1", "n2"]
    chose = await store.query("SELECT out.clone_id AS clone, cited FROM chose_from WHERE in = type::thing('consensus',"
                              " $key) ORDER BY clone;", {"key": key})
    assert chose == [{"clone": "a", "cited": False}, {"clone": "b", "cited": True}]  # the inputs; b was cited

    stored = await store.get(record_id)
    assert stored.synthesis == synthesis and stored.prompt == "p?" and stored.votes[1].latency_ms == 10.0

    # Retried with other votes: the old clones, votes and edges are gone, nothing is doubled.
    await store.save(decision, votes[:2], "synthesize", "graph-1", prompt="p?", prompt_vector=[1.0, 0.0],
                     synthesis=synthesis)
    await store.save(decision, votes[:2], "synthesize", "graph-1", prompt="p?", prompt_vector=[1.0, 0.0],
                     synthesis=synthesis)
    assert await store.graph_counts("graph-1") == {"spawned": 2, "clones": 2, "votes": 2, "decided": 1,
                                                    "chose_from": 2, "ran_on": 2}
    for table in ("mission", "consensus", "clone", "vote", "spawned", "cast", "ran_on", "chose_from", "decided"):
        expected = {"mission": 1, "consensus": 1, "chose_from": 2, "decided": 1}.get(table, 2)
        assert await count(store, table) == expected, table
    assert await count(store, "clone WHERE mission = type::thing('mission', $key)", key=key) == 2

    contributions, summary = await store.node_votes("n1", 10)
    assert [(c.clone_id, c.chosen, c.cited) for c in contributions] == [("a", True, False)]
    assert (summary.votes, summary.chosen) == (1, 1)
    contributions, summary = await store.node_votes("n2", 10)
    assert [(c.clone_id, c.chosen, c.cited) for c in contributions] == [("b", True, True)]
    assert summary.cited == 1


async def test_similar_missions_rank_by_cosine_and_skip_other_dimensions(store):
    decision = Decision(answer="x", winner="a", agreement=1.0, groups=[["a"]])
    await store.save(decision, [vote("a", "n")], "medoid", "near", prompt="near", prompt_vector=[1.0, 0.1, 0.0])
    await store.save(decision, [vote("a", "n")], "medoid", "far", prompt="far", prompt_vector=[0.0, 1.0, 0.0])
    await store.save(decision, [vote("a", "n")], "medoid", "old-model", prompt="old", prompt_vector=[1.0, 0.0])
    await store.save(decision, [vote("a", "n")], "medoid", "no-vector", prompt="none", prompt_vector=None)
    found = await store.similar_missions([1.0, 0.0, 0.0], 5)
    assert [m.mission_id for m in found] == ["near", "far"]
    assert found[0].score == pytest.approx(0.995, abs=1e-3) and found[1].score == pytest.approx(0.0, abs=1e-6)
    assert [m.mission_id for m in await store.similar_missions([1.0, 0.0, 0.0], 1)] == ["near"]


async def test_a_client_may_ask_for_history(nats_url, stack_home, decided):
    # Needs `magi.consensus.history` in the client role's publish permissions (shared/roles.py).
    client = await stack.connect_as(stack_home, nats_url, "client")
    try:
        reply = await history(client, node=PI, k=50)
    finally:
        await client.close()
    assert {c.clone_id for c in reply.contributions} == {"b", "d", "g"}
