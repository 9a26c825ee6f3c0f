"""Scheduler: the cluster's node registry (kept in Redis) and its resource report."""
