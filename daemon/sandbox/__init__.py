"""The sandbox: every byte that someone else wrote is parsed in a child process, never in the daemon.

- :mod:`daemon.sandbox.pool`: the daemon's side, :class:`Sandbox` (a pool of pre-started children, the calls, the
  checks on every reply);
- :mod:`daemon.sandbox.child`: the child (warm-up, confinement, the request loop, the operations);
- :mod:`daemon.sandbox.confine`: resource limits, no new privileges, Landlock, seccomp;
- :mod:`daemon.sandbox.wire`: the messages: JSON and sealed memfds over a ``SOCK_SEQPACKET`` pair.

docs/security.md describes the design, its limits and what a bomb costs.
"""

from daemon.sandbox.pool import Sandbox, auto_memory_limit

__all__ = ["Sandbox", "auto_memory_limit"]
