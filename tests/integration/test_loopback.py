"""Nothing of ours listens beyond loopback (Ray binds every interface unless confined)."""

import psutil
import pytest

from shared.procs import process_tree

pytestmark = pytest.mark.integration

LOOPBACK = {"127.0.0.1", "::1"}


def test_every_listener_of_the_stack_is_on_loopback(magi_stack):
    ours = {p.pid for c in magi_stack.components for p in process_tree(c.pid)}
    assert len(ours) > len(magi_stack.components), "expected Ray's processes under the inference service"
    listeners = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listeners, "the stack should be listening somewhere"
    exposed = [(c.pid, c.laddr.ip, c.laddr.port) for c in listeners if c.laddr.ip not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
