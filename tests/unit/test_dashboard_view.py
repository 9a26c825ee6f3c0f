"""The dashboard's fan-out and mission folding: pure, no servers."""

from __future__ import annotations

from collections import OrderedDict

import msgspec
import pytest

from protos.mission import MissionClone, MissionDecided, MissionEvent, MissionFailed, MissionStarted, PlannedClone
from services.gateway.cluster_view import QUEUE_EVENTS, Hub, apply_event

pytestmark = pytest.mark.unit


async def test_a_slow_browser_loses_its_backlog_not_memory_and_others_keep_theirs():
    hub = Hub()
    slow, quick = hub.add(), hub.add()
    for i in range(QUEUE_EVENTS + 50):
        hub.send(b"event %d" % i)
        if not quick.queue.empty():
            quick.queue.get_nowait()  # a browser that keeps up
    assert slow.lagged and slow.queue.qsize() == 0 and slow.dropped == QUEUE_EVENTS + 50
    assert not quick.lagged and quick.dropped == 0
    hub.close()  # stopping: every feed gets its end marker
    assert quick.queue.get_nowait() == b"" and slow.queue.get_nowait() == b"" and not hub.browsers


def test_events_fold_into_a_mission_and_only_the_latest_are_kept():
    missions: OrderedDict[str, dict] = OrderedDict()
    apply_event(missions, MissionStarted(mission_id="m1", prompt="Why?", strategy="medoid",
                                         clones=[PlannedClone(clone_id="var0", role="fast")]))
    apply_event(missions, MissionClone(mission_id="m1", clone_id="var0", ok=True, text="<b>because</b>"))
    apply_event(missions, MissionClone(mission_id="m1", clone_id="var0", ok=True, text="again"))  # redelivered
    m = apply_event(missions, MissionDecided(mission_id="m1", strategy="medoid", answer="because", agreement=1.0))
    assert m["state"] == "decided" and m["prompt"] == "Why?" and [c["text"] for c in m["clones"]] == ["again"]
    assert m["consensus"]["answer"] == "because" and m["planned"] == [{"clone_id": "var0", "role": "fast",
                                                                        "variation": ""}]
    # An attempt fails, and the retry starts the mission afresh.
    assert apply_event(missions, MissionFailed(mission_id="m2", code=503, error="inference down"))["state"] == "failed"
    assert apply_event(missions, MissionStarted(mission_id="m2", prompt="Again?"))["state"] == "running"
    for i in range(40):
        apply_event(missions, MissionStarted(mission_id=f"x{i}"), keep=30)
    assert len(missions) == 30 and "m1" not in missions and next(reversed(missions)) == "x39"


def test_mission_events_are_a_tagged_union_every_field_defaulted():
    decoder = msgspec.json.Decoder(MissionEvent)
    for kind, cls in (("started", MissionStarted), ("clone", MissionClone), ("decided", MissionDecided),
                      ("failed", MissionFailed)):
        event = decoder.decode(b'{"type": "%s"}' % kind.encode())
        assert type(event) is cls and event.mission_id == ""
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(b'{"type": "exploded"}')

