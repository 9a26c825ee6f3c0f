"""Reading the inference service's counters from `$SRV.STATS` (NATS micro monitoring), as an operator would."""

import json


async def inference_stats(nc) -> dict:
    reply = await nc.request("$SRV.STATS.magi-inference", b"", timeout=5)
    endpoints = json.loads(reply.data)["endpoints"]
    return next(e["data"] for e in endpoints if e["name"] == "generate")


async def model_counter(nc, model: str, name: str) -> int:
    return (await inference_stats(nc))["models"][model][name]
