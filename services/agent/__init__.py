"""Node agent: one per machine; publishes heartbeats with real resource figures."""
