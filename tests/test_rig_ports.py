"""The rig's free ports: ones no outgoing connection can take before the server binds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rig import processes
from rig.processes import free_port


def _kernel_outgoing_range() -> range:
    # Read here, not through `processes.outgoing_port_range`: the tests check that helper's use.
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_a_free_port_is_outside_the_range_of_outgoing_connections_and_bindable() -> None:
    outgoing = _kernel_outgoing_range()
    # A kernel whose range starts below the rig's lowest pick leaves only the OS's choice.
    room_below = outgoing.start > processes._LOWEST_PICKED
    for _ in range(50):
        port = free_port()
        assert (port not in outgoing) if room_below else port in outgoing
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen()


def _window(monkeypatch: pytest.MonkeyPatch, size: int) -> list[int]:
    """Make `free_port` pick from `size` ports (a window found free now)."""
    outgoing = _kernel_outgoing_range()
    low = free_port()
    while not all(processes.port_is_free(port) for port in range(low, low + size)):
        low = free_port()
    monkeypatch.setattr(processes, "_LOWEST_PICKED", low)
    monkeypatch.setattr(processes, "outgoing_port_range", lambda: range(low + size, outgoing.stop))
    monkeypatch.setattr(processes, "_handed_out", set())
    return list(range(low, low + size))


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    return listener


def test_a_port_some_server_listens_on_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    window = _window(monkeypatch, 8)
    listeners = [_listen(port) for port in window[:-1]]  # bound without free_port's knowledge
    try:
        assert free_port() == window[-1]
    finally:
        for listener in listeners:
            listener.close()


def test_with_every_port_below_the_outgoing_range_taken_the_os_chooses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    window = _window(monkeypatch, 4)
    listeners = [_listen(port) for port in window]
    try:
        port = free_port()
        assert port not in window
        _listen(port).close()
    finally:
        for listener in listeners:
            listener.close()


def test_no_port_is_handed_out_twice_in_one_process() -> None:
    # Two servers asked for before either starts (a fixture's metrics and listen ports)
    # must not be given one port.
    picked = [free_port() for _ in range(500)]
    assert len(set(picked)) == len(picked)


def test_on_a_kernel_whose_range_leaves_nothing_below_the_os_chooses_and_never_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processes, "outgoing_port_range", lambda: range(1024, 65536))
    monkeypatch.setattr(processes, "_handed_out", set())
    picked = [free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    for port in picked[:20]:
        _listen(port).close()
