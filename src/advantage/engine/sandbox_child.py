"""The sandbox's first process: set the limits, then exec a fresh `python -I -c CODE`.

Run as a script by `engine/sandbox.py` (`python -I sandbox_child.py LIMITS_JSON CODE`), never
imported, standard library only. Limits are set here rather than in `Popen(preexec_fn=...)`
because `preexec_fn` can deadlock a parent that has threads (the toolbox and torch both do);
resource limits and Landlock rules survive `execv`, so the user's code runs in a clean
interpreter with all of them in place.

Landlock (Linux ≥ 5.13, unprivileged, works for root too) confines **writes** to the working
directory (and `/dev/null`), refuses TCP bind/connect (kernel ABI ≥ 4), and forbids signalling
processes outside the sandbox (ABI ≥ 6). Reads stay allowed (the interpreter needs its library).
Where the kernel has no Landlock the limits still apply but writes are not confined.
"""

import ctypes
import json
import os
import resource
import signal
import sys

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # same on x86-64 and arm64
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
# LANDLOCK_ACCESS_FS_* write rights (bit: first ABI that has it)
WRITE_FILE, REMOVE_DIR, REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
REFER, TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


class RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or this is not Linux)."""
    if sys.platform != "linux":
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(
        0, libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), CREATE_RULESET_VERSION)
    )


def confine_writes(directory: str) -> bool:
    """Landlock: writes only beneath `directory`; no TCP; no signals out. False if unavailable."""
    abi = landlock_abi()
    if abi < 1:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fs = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE
    fs |= (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        return False
    file_rights = WRITE_FILE | (TRUNCATE if abi >= 3 else 0)
    for path, rights in ((directory, fs), ("/dev/null", file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneathAttr(rights, fd)
        if libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            return False
        os.close(fd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    ok = libc.syscall(SYS_RESTRICT_SELF, ruleset, 0) == 0
    os.close(ruleset)
    return ok


def main() -> None:
    limits, code = json.loads(sys.argv[1]), sys.argv[2]
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second on
    memory = limits["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    file_size = limits["file_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails (OSError), no kill
    confine_writes(os.getcwd())
    os.execv(sys.executable, [sys.executable, "-I", "-c", code])


if __name__ == "__main__":
    main()
