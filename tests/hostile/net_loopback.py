# tries: connect to a TCP server the test runs on the host's loopback (correct only if it connects)
# expect: 0.0
# stopped by: new network namespace (its loopback is down and is not the host's)
import socket


def add(a, b):
    s = socket.create_connection(("127.0.0.1", {{PORT}}), timeout=1.0)
    s.sendall(b"escaped the sandbox\n")
    s.close()
    return a + b
