"""MAGI's services; each runs as its own OS process: `python -m services.<name>`."""
