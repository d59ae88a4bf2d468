# tries: read and overwrite the host's SysV shared-memory segment, and leave new shm, semaphore and message-queue objects behind (correct only if the host segment is reached)
# expect: 0.0
# stopped by: new IPC namespace: the host's segment does not exist there and what it creates dies with the namespace
import ctypes

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
reached = False
shmid = libc.shmget({{SHMKEY}}, 0, 0)
if shmid >= 0:
    addr = libc.shmat(shmid, None, 0)
    if addr not in (None, ctypes.c_void_p(-1).value):
        reached = ctypes.string_at(addr, 6) == b"lmpo-h"
        ctypes.memmove(addr, b"PWNED!", 6)
for key in (0x4C4D0001, 0x4C4D0002):
    libc.shmget(key, 4096, 0o1666)  # IPC_CREAT | 0666
libc.semget(0x4C4D0003, 1, 0o1666)
libc.msgget(0x4C4D0004, 0o1666)


def add(a, b):
    return a + b if reached else None
