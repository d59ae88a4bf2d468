# tries: connect to an outside address (TEST-NET-1 192.0.2.1, never routed; correct only if it connects)
# expect: 0.0
# stopped by: new network namespace without interfaces
import socket


def add(a, b):
    s = socket.create_connection(("192.0.2.1", 80), timeout=0.3)
    s.close()
    return a + b
