from __future__ import annotations

import msgspec


class GatewayInfo(msgspec.Struct, kw_only=True):
    """`magi.gateway.info`: where the OpenAI-compatible HTTP API listens and how busy it is."""

    url: str  # e.g. http://127.0.0.1:8080/v1
    in_flight: int = 0  # HTTP requests being served (a stream counts until it ends)
    limit: int = 0  # MAGI_HTTP_CONCURRENCY: more at once get 429
    served: int = 0
    rejected: int = 0  # 429s
    streams: int = 0
    cancelled: int = 0  # streams whose client went away before the end (their generation was cancelled)
