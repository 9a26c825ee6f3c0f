"""SurrealDB storage of consensus records and their votes (embedded SurrealKV or a server).

One handle per database path per process: two embedded handles on one path do not see each
other's writes. Embedded connections have no `begin()`, so a transaction is one `query()` text.
Values always travel as query variables, never spliced into SurrealQL.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime
from pathlib import Path

from surrealdb import AsyncSurreal

from protos.consensus import ConsensusRecord, Vote
from services.consensus.strategies import Decision
from shared.config import Settings
from shared.errors import BadRequest, NotFound

_ID = re.compile(r"^(?:consensus:)?([A-Za-z0-9_]{1,64})$")

# UPSERT and the vote reset make a retried mission (same key) overwrite its record, never add a second.
_STORE = """
BEGIN TRANSACTION;
DELETE vote WHERE consensus = type::thing('consensus', $key);
UPSERT type::thing('consensus', $key) SET mission_id = $mission_id, strategy = $strategy, answer = $answer,
    agreement = $agreement, winner = $winner, groups = $groups, similarity = $similarity, votes = $votes,
    timestamp = time::now();
FOR $vote IN $votes {
    CREATE vote SET consensus = type::thing('consensus', $key), position = $vote.position, clone_id = $vote.clone_id,
        text = $vote.text, role = $vote.role, model = $vote.model, node = $vote.node, ok = $vote.ok;
};
COMMIT TRANSACTION;
"""
_GET = "SELECT * FROM type::thing('consensus', $key);"
_BY_MISSION = "SELECT id FROM consensus WHERE mission_id = $mission_id;"
_VOTES = "SELECT * FROM vote WHERE consensus = type::thing('consensus', $key) ORDER BY position;"


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
        db = AsyncSurreal(url)
        if hasattr(db, "connect"):
            await db.connect()
        if settings.surreal_user:
            await db.signin({"username": settings.surreal_user, "password": settings.surreal_pass})
        await db.use("magi", "magi")
        return cls(db)

    async def save(self, decision: Decision, votes: list[Vote], strategy: str, mission_id: str) -> str:
        key = record_key(mission_id)
        rows = [dict(clone_id=v.clone_id, text=v.text, role=v.role, model=v.model, node=v.node, ok=v.ok, position=i)
                for i, v in enumerate(votes)]
        await self.db.query(_STORE, {
            "key": key, "mission_id": mission_id, "strategy": strategy, "answer": decision.answer,
            "agreement": decision.agreement, "winner": decision.winner, "groups": decision.groups, "votes": rows,
            "similarity": decision.similarity,
        })
        return f"consensus:{key}"

    async def get(self, record_id: str) -> ConsensusRecord:
        key = parse_id(record_id)
        found = await self.db.query(_GET, {"key": key})
        if not found:
            raise NotFound(f"no consensus record {record_id}", field="id")
        record = found[0]
        votes = await self.db.query(_VOTES, {"key": key})
        return ConsensusRecord(
            id=f"consensus:{key}", answer=record["answer"], strategy=record["strategy"],
            agreement=record["agreement"], winner=record["winner"], groups=record.get("groups", []),
            mission_id=record.get("mission_id", ""), created_at=_iso(record.get("timestamp")),
            similarity=record.get("similarity", "words"),
            votes=[Vote(clone_id=v["clone_id"], text=v["text"], role=v.get("role", ""), model=v.get("model", ""),
                        node=v.get("node", ""), ok=v.get("ok", True)) for v in votes],
        )

    async def ids_of_mission(self, mission_id: str) -> list[str]:
        """Every record stored for a mission (one, unless something bypassed `record_key`)."""
        rows = await self.db.query(_BY_MISSION, {"mission_id": mission_id})
        return sorted(f"consensus:{row['id'].id}" if hasattr(row["id"], "id") else str(row["id"]) for row in rows)

    async def close(self) -> None:
        await self.db.close()


def _iso(value) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value or "")
