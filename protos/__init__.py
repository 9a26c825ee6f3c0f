"""Wire contracts of every MAGI subject: msgspec Structs, JSON on the wire.

This package is the single source of contracts; `just protos` exports JSON Schemas to protos/schema/.
Wire messages do not forbid unknown fields, so older services accept newer clients' additions.
"""
