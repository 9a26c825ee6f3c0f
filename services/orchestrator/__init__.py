"""Mission orchestrator: the seed's execute_mission over NATS (clones in parallel, then consensus)."""
