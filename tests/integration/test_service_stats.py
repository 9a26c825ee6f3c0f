"""`$SRV.STATS` tells the truth: requests, errors and processing time of the work itself (`nats micro stats`)."""

import json

import pytest

from protos.infer import EmbedReply, EmbedRequest
from shared import bus
from shared.errors import BadRequest

pytestmark = pytest.mark.integration


async def _embed_stats(nc) -> dict:
    reply = await nc.request("$SRV.STATS.magi-inference", b"", timeout=5)
    return next(e for e in json.loads(reply.data)["endpoints"] if e["subject"] == "magi.infer.embed")


async def test_stats_count_errors_and_time_the_handler_not_the_dispatch(nc):
    before = await _embed_stats(nc)
    texts = ["a sentence to embed so the model does some work"] * 32
    await bus.request(nc, "magi.infer.embed", EmbedRequest(texts=texts), EmbedReply, timeout=60)
    with pytest.raises(BadRequest):
        await bus.request(nc, "magi.infer.embed", {"texts": "not a list"}, EmbedReply, timeout=10)
    after = await _embed_stats(nc)
    assert after["num_requests"] - before["num_requests"] == 2
    assert after["num_errors"] - before["num_errors"] == 1
    assert after["last_error"].startswith("400:") and "Error(" not in after["last_error"]  # never a repr()
    # 32 texts through the embedding model take milliseconds; the dispatch alone takes microseconds.
    assert after["processing_time"] - before["processing_time"] > 1_000_000
    assert after["average_processing_time"] == after["processing_time"] // after["num_requests"]
