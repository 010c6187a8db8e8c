"""The confinement of a sandbox child: resource limits, no new privileges, Landlock and a seccomp filter.

Applied once, by the child itself, after it has imported and warmed up every decoder it will use and before it reads
its first request, so nothing it does afterwards can reach a file by its path, open a socket, run a program, trace
or signal another process, or gain a privilege:

- ``RLIMIT_CORE`` 0 (a crash leaves no core with a stranger's pixels in it), ``RLIMIT_NOFILE`` small;
- ``RLIMIT_AS`` and ``RLIMIT_CPU``: the hard limits here (the most any one call may get); each call then lowers or
  raises the soft limit to its own budget (:func:`set_call_limits`);
- ``PR_SET_NO_NEW_PRIVS``: no setuid program, no file capability can raise what it may do;
- Landlock (Linux 5.13+, where the LSM is enabled): no file may be opened, created or removed by path, no TCP port
  bound or connected (ABI 4+), and no signal sent nor abstract socket reached outside the child (ABI 6+). The file
  descriptors it already holds (its socket, ``/proc/self/statm``) keep working: Landlock checks paths, not fds;
- seccomp (x86-64 and arm64): a deny list that answers EPERM to ``execve``, ``ptrace``, sockets, mounts, namespaces,
  kernel modules, BPF and the like.

Each layer is used where the kernel offers it and reported by :func:`apply` (the child logs what it got). None of
them is needed for correctness: they shrink what a decoder bug could be turned into.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import signal
import struct
from dataclasses import dataclass, field

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on x86-64 and arm64 (a generic syscall since 5.13)
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
# Filesystem rights by ABI version: 1 has bits 0-12, 2 adds REFER (13), 3 TRUNCATE (14), 5 IOCTL_DEV (15).
_FS_BITS = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}
LANDLOCK_NET_ALL = 0b11  # BIND_TCP, CONNECT_TCP (ABI 4+)
LANDLOCK_SCOPE_ALL = 0b11  # ABSTRACT_UNIX_SOCKET, SIGNAL (ABI 6+)

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# What a decoder never needs, by architecture: each answers EPERM.
_DENIED = {
    "x86_64": {
        "execve": 59,
        "execveat": 322,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "socket": 41,
        "socketpair": 53,
        "connect": 42,
        "accept": 43,
        "accept4": 288,
        "bind": 49,
        "listen": 50,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "setns": 308,
        "unshare": 272,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "bpf": 321,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "io_uring_setup": 425,
        "name_to_handle_at": 303,
        "open_by_handle_at": 304,
        "fork": 57,
        "vfork": 58,
        "kill": 62,
        "tkill": 200,
        "setuid": 105,
        "setgid": 106,
        "reboot": 169,
        "swapon": 167,
        "swapoff": 168,
    },
    "aarch64": {
        "execve": 221,
        "execveat": 281,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "socket": 198,
        "socketpair": 199,
        "connect": 203,
        "accept": 202,
        "accept4": 242,
        "bind": 200,
        "listen": 201,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "setns": 268,
        "unshare": 97,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "bpf": 280,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "io_uring_setup": 425,
        "name_to_handle_at": 264,
        "open_by_handle_at": 265,
        "kill": 129,
        "tkill": 130,
        "setuid": 146,
        "setgid": 144,
        "reboot": 142,
        "swapon": 224,
        "swapoff": 225,
    },
}
_X32_BIT = 0x40000000  # x86-64's x32 ABI: the same calls under other numbers, refused as a whole


@dataclass
class Confinement:
    """What :func:`apply` could put in place."""

    no_new_privs: bool = False
    landlock_abi: int = 0  # 0: not available
    seccomp: bool = False
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = ["rlimits"]
        if self.no_new_privs:
            parts.append("no_new_privs")
        parts.append(f"landlock ABI {self.landlock_abi}" if self.landlock_abi else "no landlock")
        parts.append("seccomp" if self.seccomp else "no seccomp")
        return ", ".join(parts)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _set(limit: int, soft: int, hard: int) -> None:
    _, old_hard = resource.getrlimit(limit)
    if old_hard != resource.RLIM_INFINITY:
        hard = min(hard, old_hard) if hard != resource.RLIM_INFINITY else old_hard
        soft = min(soft, hard) if soft != resource.RLIM_INFINITY else hard
    resource.setrlimit(limit, (soft, hard))


def set_hard_limits(memory_bytes: int, cpu_seconds: int, files: int = 64) -> None:
    """The most any call may use: address space, CPU seconds over the child's life, open files; no core files."""
    _set(resource.RLIMIT_CORE, 0, 0)
    _set(resource.RLIMIT_NOFILE, files, files)
    _set(resource.RLIMIT_AS, memory_bytes, memory_bytes)
    _set(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds)


def set_call_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """One call's budget: the soft limits, within the hard ones (an unprivileged process may move a soft limit up
    to its hard limit and no further). Past the memory one an allocation fails (``MemoryError``); past the CPU
    one the kernel sends SIGXCPU, which kills the child."""
    _, as_hard = resource.getrlimit(resource.RLIMIT_AS)
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    if as_hard != resource.RLIM_INFINITY:
        memory_bytes = min(memory_bytes, as_hard)
    if cpu_hard != resource.RLIM_INFINITY:
        cpu_seconds = min(cpu_seconds, cpu_hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, as_hard))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_hard))


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers, 0 when it has none (or the LSM is off)."""
    libc = _libc()
    version = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, int(version))


def _landlock(abi: int) -> None:
    """Deny every filesystem right by path (no rule grants any), TCP, and (ABI 6+) signals and abstract sockets
    outside this process."""
    libc = _libc()
    fs = (1 << _FS_BITS.get(abi, 16)) - 1
    if abi >= 6:
        attr = struct.pack("QQQ", fs, LANDLOCK_NET_ALL, LANDLOCK_SCOPE_ALL)
    elif abi >= 4:
        attr = struct.pack("QQ", fs, LANDLOCK_NET_ALL)
    else:
        attr = struct.pack("Q", fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def seccomp_program(arch: str) -> bytes:
    """The BPF program: the wrong architecture (or the x32 ABI) is refused, each denied call answers EPERM, and
    everything else is allowed.

    Raises:
        KeyError: an architecture we have no syscall table for.
    """
    denied = sorted(set(_DENIED[arch].values()))
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    n = len(denied)
    # 0: load arch; 1: arch ok? else jump to deny; 2: load nr; 3: x32? deny; 4..4+n-1: each denied nr;
    # 4+n: allow; 5+n: deny.
    prog = [(ld_abs, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[arch])]
    prog.append((ret, 0, 0, deny))  # a foreign architecture's calls: refused
    prog.append((ld_abs, 0, 0, 0))
    prog.append((jge, n + 1, 0, _X32_BIT) if arch == "x86_64" else (jeq, 0, 0, 0))
    for i, nr in enumerate(denied):
        prog.append((jeq, n - i, 0, nr))
    prog.append((ret, 0, 0, allow))
    prog.append((ret, 0, 0, deny))
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def _seccomp(arch: str) -> None:
    libc = _libc()
    code = seccomp_program(arch)
    filters = ctypes.create_string_buffer(code, len(code))
    prog = struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(filters))
    buf = ctypes.create_string_buffer(prog, len(prog))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, buf, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"seccomp: {os.strerror(ctypes.get_errno())}")


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it (the daemon's sandbox spawner) ends,
    however the daemon died: a child stopped with SIGSTOP, or stuck in a loop, would never read the end of its
    socket and would outlive the daemon with its memory. A daemon that died before this call is seen as the end
    of the socket, the child's next read."""
    if _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"PR_SET_PDEATHSIG: {os.strerror(ctypes.get_errno())}")


def apply(memory_bytes: int, cpu_seconds: int, *, landlock: bool = True, seccomp: bool = True) -> Confinement:
    """Confine the calling process for good (it cannot be undone). Returns what was put in place; a layer the
    kernel does not offer is left out with a note, never an error.

    Raises:
        OSError: a resource limit could not be set (the child must not run without them).
    """
    out = Confinement()
    set_hard_limits(memory_bytes, cpu_seconds)
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        out.no_new_privs = True
    else:
        out.notes.append(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
    if landlock:
        abi = landlock_abi()
        if abi and out.no_new_privs:
            try:
                _landlock(abi)
                out.landlock_abi = abi
            except OSError as exc:
                out.notes.append(str(exc))
        else:
            out.notes.append("landlock: not offered by this kernel")
    arch = platform.machine()
    if seccomp and arch in _DENIED and out.no_new_privs:
        try:
            _seccomp(arch)
            out.seccomp = True
        except OSError as exc:
            out.notes.append(str(exc))
    elif seccomp:
        out.notes.append(f"seccomp: no syscall table for {arch}")
    return out
