# tries: connect to an abstract unix socket the host listens on (correct only if it connects)
# expect: 0.0
# stopped by: new network namespace (abstract unix sockets belong to a network namespace)
import socket

connected = False
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\0lmpo-hostile-{{TAG}}")
    connected = True
except OSError:
    pass


def add(a, b):
    return a + b if connected else None
