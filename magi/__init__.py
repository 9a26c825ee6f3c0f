"""The operator's tooling: the `magi` command, the local stack, `magi cluster init` and the demo.

Imports point one way: protos <- shared <- services <- magi <- benchmarks. Services never import this
package; it starts them as processes and talks to them over the bus.
"""
