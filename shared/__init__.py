"""MAGI's own library: configuration, errors, the NATS service framework, the local stack and the CLI."""
