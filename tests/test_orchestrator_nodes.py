"""Several hosts in one group: gloo's interface towards the master, and naming a lost node."""
import socket

import pytest

from ryzlab.orchestrator import nodes
from ryzlab.orchestrator.nodes import NodeWatch, choose_gloo_interface, interface_with_address, local_address_towards


def test_interface_owning_an_address():
    assert interface_with_address("127.0.0.1") == "lo"
    assert interface_with_address("203.0.113.77") is None  # TEST-NET-3: nobody here has it


def test_loopback_master_leaves_gloo_alone(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert choose_gloo_interface("127.0.0.1") is None
    assert "GLOO_SOCKET_IFNAME" not in __import__("os").environ


def test_user_choice_is_kept(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert choose_gloo_interface("10.1.2.3") == "eth7"


def test_remote_master_picks_the_interface_towards_it(monkeypatch):
    """Old code let gloo bind to the hostname's address (often 127.0.0.1): other nodes cannot reach it."""
    try:
        mine = local_address_towards("192.0.2.1")  # any non-loopback route of this host
    except OSError:
        pytest.skip("no non-loopback route on this host")
    name = interface_with_address(mine)
    if name in (None, "lo"):
        pytest.skip("the default route leaves through no named interface")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(nodes.os, "environ", dict(nodes.os.environ))  # the choice stays in this test
    assert choose_gloo_interface(mine) == name
    assert nodes.os.environ["GLOO_SOCKET_IFNAME"] == name


def _listener(addr):
    s = socket.socket()
    s.bind((addr, 0))
    s.listen()
    return s


def _watch(rank, listeners):
    """A NodeWatch over a given table (its constructor needs a process group); 127.0.0.x are
    distinct addresses on Linux's loopback, so each stands for a node."""
    w = object.__new__(NodeWatch)
    w.table, w.rank, w.probe_timeout_s, w._sock = [s.getsockname() for s in listeners], rank, 1.0, listeners[rank]
    return w


def test_watch_names_the_node_whose_ranks_all_stopped_answering():
    ranks = [_listener("127.0.0.1"), _listener("127.0.0.1"), _listener("127.0.0.2"), _listener("127.0.0.2")]
    w = _watch(0, ranks)
    ranks[1].close()  # a rank of our own node died too (the cascade): our node is not "lost"
    ranks[2].close(), ranks[3].close()  # closed port -> connection refused, as for a killed process
    err = w.describe(RuntimeError("Connection closed by peer [127.0.0.1]:1"), "after 3 decode token(s)")
    assert err is not None and err.lost == ["127.0.0.2"]
    assert "rank 0 on node 127.0.0.1: lost node 127.0.0.2 (ranks 2, 3) after 3 decode token(s)" in str(err)
    w.close()


def test_a_node_with_one_live_rank_is_not_lost():
    ranks = [_listener("127.0.0.1"), _listener("127.0.0.2"), _listener("127.0.0.2")]
    w = _watch(0, ranks)
    ranks[1].close()
    assert w.describe(RuntimeError("reset"), "during generate") is None
    w.close(), ranks[2].close()
