"""SurrealDB storage of consensus records, their votes, and the mission graph (embedded SurrealKV or a server).

One handle per database path per process: two embedded handles on one path do not see each
other's writes. Embedded connections have no `begin()`, so a transaction is one `query()` text.
Values always travel as query variables, never spliced into SurrealQL.

The mission graph (README, "Mission graph"): a `mission` record per mission, keyed like its consensus
record, with the prompt and its embedding; a `clone` record per vote (who answered: role, model, node,
latency) and the `vote` record (what it answered), joined by edges:

    mission ->spawned-> clone ->cast-> vote        clone ->ran_on-> node
    mission ->decided-> consensus ->chose_from-> vote   (chose_from.cited: the synthesis cited it)
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime
from pathlib import Path

import msgspec
from surrealdb import AsyncSurreal

from protos.consensus import ConsensusRecord, Contribution, NodeSummary, PastMission, Synthesis, Vote
from services.consensus.strategies import Decision
from shared.config import Settings
from shared.errors import BadRequest, Internal, NotFound

_ID = re.compile(r"^(?:consensus:)?([A-Za-z0-9_]{1,64})$")

# Indexes for the lookups by field (the graph's own lookups follow edges and need none).
_SCHEMA = """
DEFINE INDEX IF NOT EXISTS vote_consensus ON vote FIELDS consensus;
DEFINE INDEX IF NOT EXISTS clone_mission ON clone FIELDS mission;
DEFINE INDEX IF NOT EXISTS consensus_mission ON consensus FIELDS mission_id;
DEFINE INDEX IF NOT EXISTS mission_created ON mission FIELDS created_at;
"""

# UPSERT and the resets make a retried mission (same key) overwrite its record and its graph, never add a
# second: the old clones and votes are found by field (indexed; votes stored before the graph existed go
# too), and every edge that touches them is deleted by id before they are. (Deleting a record alone is not
# enough: SurrealKV left some of a deleted clone's `ran_on` edges behind when the clone was created again.)
_STORE = """
BEGIN TRANSACTION;
LET $consensus = type::thing('consensus', $key);
LET $mission = type::thing('mission', $key);
LET $old_clones = (SELECT VALUE id FROM clone WHERE mission = $mission);
LET $old_votes = (SELECT VALUE id FROM vote WHERE consensus = $consensus);
DELETE array::flatten((SELECT VALUE ->ran_on FROM $old_clones));
DELETE array::flatten((SELECT VALUE ->cast FROM $old_clones));
DELETE array::flatten((SELECT VALUE <-spawned FROM $old_clones));
DELETE array::flatten((SELECT VALUE <-chose_from FROM $old_votes));
DELETE array::flatten((SELECT VALUE ->decided FROM $mission));
DELETE $old_clones;
DELETE $old_votes;
UPSERT $consensus SET mission_id = $mission_id, strategy = $strategy, answer = $answer,
    agreement = $agreement, winner = $winner, groups = $groups, similarity = $similarity, votes = $votes,
    prompt = $prompt, synthesis = $synthesis, timestamp = time::now();
UPSERT $mission SET mission_id = $mission_id, prompt = $prompt, embedding = $embedding, created_at = time::now();
FOR $vote IN $votes {
    LET $vote_id = type::thing('vote', [$key, $vote.position]);
    LET $clone_id = type::thing('clone', [$key, $vote.position]);
    CREATE $vote_id SET consensus = $consensus, position = $vote.position, clone_id = $vote.clone_id,
        text = $vote.text, role = $vote.role, model = $vote.model, node = $vote.node, ok = $vote.ok,
        latency_ms = $vote.latency_ms;
    CREATE $clone_id SET mission = $mission, clone_id = $vote.clone_id, role = $vote.role, model = $vote.model,
        node = $vote.node, ok = $vote.ok, latency_ms = $vote.latency_ms, created_at = time::now();
    RELATE $mission->spawned->$clone_id;
    RELATE $clone_id->cast->$vote_id;
    IF $vote.node != '' {
        LET $node = type::thing('node', $vote.node);
        UPSERT $node SET name = $vote.node;
        RELATE $clone_id->ran_on->$node;
    };
    IF $vote.chosen {
        RELATE $consensus->chose_from->$vote_id SET cited = $vote.cited;
    };
};
RELATE $mission->decided->$consensus;
COMMIT TRANSACTION;
"""
_GET = "SELECT * FROM type::thing('consensus', $key);"
_BY_MISSION = "SELECT id FROM consensus WHERE mission_id = $mission_id;"
_VOTES = "SELECT * FROM vote WHERE consensus = type::thing('consensus', $key) ORDER BY position;"

# A mission's decision, one hop along `decided`.
_DECISION = "(->decided->consensus.{id, answer, strategy, agreement})[0] AS decision"
# Brute-force cosine over the missions whose prompt was embedded with a model of the same dimension (a
# changed embedding model's older vectors are skipped, not compared across models); only k rows come back.
_SIMILAR = f"""
SELECT mission_id, prompt, created_at, vector::similarity::cosine(embedding, $vector) AS score, {_DECISION}
FROM mission WHERE prompt != '' AND type::is::array(embedding) AND array::len(embedding) = $dim
ORDER BY score DESC LIMIT $k;
"""
# Without an embedder, word overlap over the latest missions' prompts (ranked here, in Python).
WORDS_SCAN = 5000
_PROMPTS = "SELECT id, prompt, created_at FROM mission WHERE prompt != '' ORDER BY created_at DESC LIMIT $limit;"
_MISSIONS = f"SELECT id, mission_id, prompt, created_at, {_DECISION} FROM $ids;"

# From the node record back along `ran_on` to its clones, then out along `cast` to their votes and back in
# along `chose_from` (the consensus that chose each vote) and `spawned` (the mission that spawned the clone).
_NODE_VOTES = """
SELECT clone_id, role, model, latency_ms, ok, created_at,
    (<-spawned<-mission.mission_id)[0] AS mission_id,
    (<-spawned<-mission->decided->consensus.id)[0] AS consensus,
    (->cast->vote.text)[0] AS text,
    ->cast->vote<-chose_from.cited AS chose
FROM type::thing('node', $node)<-ran_on<-clone ORDER BY created_at DESC LIMIT $k;
"""
_NODE_SUMMARY = """
SELECT count() AS votes, count(ok) AS ok, count(array::len(->cast->vote<-chose_from) > 0) AS chosen,
    count(array::any(->cast->vote<-chose_from.cited)) AS cited, math::mean(latency_ms) AS mean_latency_ms
FROM type::thing('node', $node)<-ran_on<-clone GROUP ALL;
"""
TEXT_CHARS = 300


def record_key(mission_id: str) -> str:
    """A mission's record key derives from its id, so a retried mission overwrites its one record."""
    if not mission_id:
        return uuid.uuid4().hex
    return "m" + hashlib.sha256(mission_id.encode()).hexdigest()[:40]


def parse_id(record_id: str) -> str:
    match = _ID.match(record_id)
    if not match:
        raise BadRequest("id must look like consensus:<letters, digits, underscores>", field="id")
    return match.group(1)


def chosen_and_cited(decision: Decision, synthesis: Synthesis | None) -> tuple[set[str], set[str]]:
    """The clone ids the consensus chose from, and those a synthesis cited.

    A synthesis was written from its `inputs`; otherwise the answer came from the winner's group (for
    `longest` the winner need not be in the largest group, so the group is looked up, not assumed first).
    """
    if synthesis is not None and synthesis.inputs:
        return set(synthesis.inputs), set(synthesis.cited) & set(synthesis.inputs)
    group = next((g for g in decision.groups if decision.winner in g), decision.groups[0] if decision.groups else [])
    return set(group), set()


class ConsensusStore:
    def __init__(self, db) -> None:
        self.db = db

    @classmethod
    async def open(cls, settings: Settings) -> "ConsensusStore":
        url = settings.surreal_url
        if not url:
            path = settings.home_path / "surreal" / "consensus.db"
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            url = f"surrealkv://{path}"
        return await cls.connect(url, settings.surreal_user, settings.surreal_pass)

    @classmethod
    async def connect(cls, url: str, user: str = "", password: str = "") -> "ConsensusStore":
        db = AsyncSurreal(url)
        if hasattr(db, "connect"):
            await db.connect()
        if user:
            await db.signin({"username": user, "password": password})
        await db.use("magi", "magi")
        await db.query(_SCHEMA)
        return cls(db)

    async def save(self, decision: Decision, votes: list[Vote], strategy: str, mission_id: str, prompt: str = "",
                   prompt_vector: list[float] | None = None, synthesis: Synthesis | None = None) -> str:
        record = await self.save_record(decision, votes, strategy, mission_id, prompt, prompt_vector, synthesis)
        return record.id

    async def save_record(self, decision: Decision, votes: list[Vote], strategy: str, mission_id: str,
                          prompt: str = "", prompt_vector: list[float] | None = None,
                          synthesis: Synthesis | None = None) -> ConsensusRecord:
        """Store a decision and its graph; the record as `get` would read it back, without reading it: the
        consensus row (with the database's timestamp) is the transaction's own UPSERT result, and the votes
        are stored as given."""
        key = record_key(mission_id)
        chosen, cited = chosen_and_cited(decision, synthesis)
        rows = [dict(clone_id=v.clone_id, text=v.text, role=v.role, model=v.model, node=v.node, ok=v.ok,
                     latency_ms=float(v.latency_ms), position=i, chosen=v.ok and v.clone_id in chosen,
                     cited=v.ok and v.clone_id in cited)
                for i, v in enumerate(votes)]
        results = await self._transaction(_STORE, {
            "key": key, "mission_id": mission_id, "strategy": strategy, "answer": decision.answer,
            "agreement": decision.agreement, "winner": decision.winner, "groups": decision.groups, "votes": rows,
            "similarity": decision.similarity, "prompt": prompt,
            "embedding": [float(x) for x in prompt_vector] if prompt_vector is not None else None,
            "synthesis": msgspec.to_builtins(synthesis) if synthesis is not None else None,
        })
        row = next((found[0] for found in results if _is_row_of(found, "consensus")), None)
        if row is None:
            raise Internal("consensus store: the write did not return the consensus record")
        return _record(key, row, rows)

    async def _transaction(self, text: str, variables: dict) -> list:
        """Run a BEGIN/COMMIT text; raise the statement's own error if any statement failed (the SDK's
        `query` checks only the first statement's status). Each statement's result, in order."""
        response = await self.db.query_raw(text, variables)
        if response.get("error"):
            raise Internal(f"consensus store: {response['error']}")
        results = response.get("result") or []
        errors = [r.get("result") for r in results if r.get("status") != "OK"]
        if errors:
            cause = next((e for e in errors if "failed transaction" not in str(e)), errors[0])
            raise Internal(f"consensus store: the write failed: {cause}")
        return [r.get("result") for r in results]

    async def get(self, record_id: str) -> ConsensusRecord:
        key = parse_id(record_id)
        found = await self.db.query(_GET, {"key": key})
        if not found:
            raise NotFound(f"no consensus record {record_id}", field="id")
        votes = await self.db.query(_VOTES, {"key": key})
        return _record(key, found[0], votes)

    async def ids_of_mission(self, mission_id: str) -> list[str]:
        """Every record stored for a mission (one, unless something bypassed `record_key`)."""
        rows = await self.db.query(_BY_MISSION, {"mission_id": mission_id})
        return sorted(_rid(row["id"]) for row in rows)

    # ---- the mission graph -----------------------------------------------------------------------------

    async def similar_missions(self, vector: list[float], k: int) -> list[PastMission]:
        """The k stored missions whose prompt embeddings are closest (cosine) to `vector`, best first."""
        rows = await self.db.query(_SIMILAR, {"vector": [float(x) for x in vector], "dim": len(vector), "k": k})
        return [_past(row, float(row.get("score") or 0.0)) for row in rows or []]

    async def recent_prompts(self, limit: int = WORDS_SCAN) -> list[tuple[object, str]]:
        """(mission record id, prompt) of the latest `limit` missions that had a prompt."""
        rows = await self.db.query(_PROMPTS, {"limit": limit})
        return [(row["id"], row["prompt"]) for row in rows or []]

    async def missions(self, ids: list[object], scores: list[float]) -> list[PastMission]:
        """The missions with these record ids, in this order, each with its score."""
        rows = await self.db.query(_MISSIONS, {"ids": ids}) if ids else []
        by_id = {_rid(row["id"]): row for row in rows or []}
        return [_past(by_id[_rid(i)], s) for i, s in zip(ids, scores) if _rid(i) in by_id]

    async def node_votes(self, node: str, k: int) -> tuple[list[Contribution], NodeSummary]:
        """The node's latest k votes, newest first, and a summary of every vote it cast."""
        rows = await self.db.query(_NODE_VOTES, {"node": node, "k": k}) or []
        summary = (await self.db.query(_NODE_SUMMARY, {"node": node}) or [{}])[0]
        contributions = [
            Contribution(mission_id=row.get("mission_id") or "", consensus_id=_rid(row.get("consensus")),
                         clone_id=row.get("clone_id", ""), role=row.get("role", ""), model=row.get("model", ""),
                         latency_ms=float(row.get("latency_ms") or 0.0), ok=bool(row.get("ok", True)),
                         chosen=bool(row.get("chose")), cited=any(row.get("chose") or []),
                         text=(row.get("text") or "")[:TEXT_CHARS], created_at=_iso(row.get("created_at")))
            for row in rows]
        return contributions, NodeSummary(
            votes=int(summary.get("votes") or 0), ok=int(summary.get("ok") or 0),
            chosen=int(summary.get("chosen") or 0), cited=int(summary.get("cited") or 0),
            mean_latency_ms=round(float(summary.get("mean_latency_ms") or 0.0), 1))

    async def graph_counts(self, mission_id: str) -> dict[str, int]:
        """How many clones, votes and edges one mission's graph holds (for checks and tests)."""
        rows = await self.db.query("""
            SELECT count(->spawned) AS spawned, count(->spawned->clone) AS clones,
                count(->spawned->clone->cast->vote) AS votes, count(->decided) AS decided,
                count(->decided->consensus->chose_from) AS chose_from,
                count(->spawned->clone->ran_on) AS ran_on
            FROM ONLY type::thing('mission', $key);""", {"key": record_key(mission_id)})
        return {k: int(v) for k, v in (rows or {}).items()}

    async def query(self, text: str, variables: dict | None = None):
        """A read-only SurrealQL query on this store's handle (tests and operators inspect the graph)."""
        return await self.db.query(text, variables or {})

    async def close(self) -> None:
        await self.db.close()


def _record(key: str, record: dict, votes: list[dict]) -> ConsensusRecord:
    """A consensus row and its vote rows (in position order) as the record callers get."""
    synthesis = record.get("synthesis")
    return ConsensusRecord(
        id=f"consensus:{key}", answer=record["answer"], strategy=record["strategy"],
        agreement=record["agreement"], winner=record["winner"], groups=record.get("groups", []),
        mission_id=record.get("mission_id", ""), created_at=_iso(record.get("timestamp")),
        similarity=record.get("similarity", "words"), prompt=record.get("prompt") or "",
        synthesis=msgspec.convert(synthesis, Synthesis) if synthesis else None,
        votes=[Vote(clone_id=v["clone_id"], text=v["text"], role=v.get("role", ""), model=v.get("model", ""),
                    node=v.get("node", ""), ok=v.get("ok", True), latency_ms=float(v.get("latency_ms") or 0.0))
               for v in votes],
    )


def _is_row_of(result, table: str) -> bool:
    """A statement's result that is one row of `table` (an UPSERT's)."""
    if not isinstance(result, list) or len(result) != 1 or not isinstance(result[0], dict):
        return False
    rid = result[0].get("id")
    return getattr(rid, "table_name", str(rid).split(":")[0]) == table


def _past(row: dict, score: float) -> PastMission:
    decision = row.get("decision") or {}
    return PastMission(mission_id=row.get("mission_id") or "", consensus_id=_rid(decision.get("id")),
                       prompt=row.get("prompt") or "", answer=decision.get("answer") or "",
                       strategy=decision.get("strategy") or "", agreement=float(decision.get("agreement") or 0.0),
                       created_at=_iso(row.get("created_at")), score=round(score, 4))


def _rid(value) -> str:
    """`table:key` of a record id as the SDK returns it (a RecordID, or already a string)."""
    if value is None:
        return ""
    if hasattr(value, "table_name") and hasattr(value, "id"):
        return f"{value.table_name}:{value.id}"
    return str(value)


def _iso(value) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value or "")
