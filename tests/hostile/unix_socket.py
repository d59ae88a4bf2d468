# tries: connect to a filesystem unix socket the host listens on, world-writable (correct only if it connects)
# expect: 0.0
# stopped by: new root: the host's socket file is not in it
import socket

connected = False
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("{{SOCK}}")
    s.sendall(b"hello from the sandbox")
    connected = True
except OSError:
    pass


def add(a, b):
    return a + b if connected else None
