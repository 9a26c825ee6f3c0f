"""Consensus service: merges clone answers and stores every vote and decision in SurrealDB."""
