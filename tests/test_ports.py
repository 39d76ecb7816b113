"""tuner.ports: a port a process listens on is refused as the servers would refuse it; a free one is handed out."""

import socket

import pytest

from tuner import ports


def test_a_listening_port_is_refused_and_a_free_one_is_given():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(ports.PortError, match=f"cannot serve on 127.0.0.1:{busy}"):
            ports.check_port("127.0.0.1", busy)
    free = ports.free_port()
    assert free > 0 and ports.check_port("127.0.0.1", free) == free


def test_a_port_a_closed_connection_left_in_time_wait_is_free():
    # a server that served on the port and stopped (they all bind with SO_REUSEADDR): a connection it closed
    # leaves the port in TIME_WAIT, and the next server can listen there, so it must not read as "in use"
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as c:
            conn, _ = srv.accept()
            conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
            c.recv(1)
    assert ports.check_port("127.0.0.1", port) == port
