"""systemd's two protocols in plain Python: socket activation and sd_notify.

Both are no-ops outside systemd (or ``systemd-socket-activate``): ``listen_fds()``
returns nothing when ``LISTEN_PID`` is not this process, and ``notify()`` does
nothing without ``NOTIFY_SOCKET`` and never raises.
See sd_listen_fds(3) and sd_notify(3).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The sockets systemd passed to this process (fd 3, 4, ...), or [] when none were.

    The variables are removed from the environment so that children (the worker)
    never mistake them for their own.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if pid != os.getpid():
        return []
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    socks = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds() sets it
        socks.append(socket.socket(fileno=fd))
    return socks


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1", "STATUS=idle") to the service manager.

    Returns whether it was sent; False outside systemd. Never raises and never blocks.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), addr)
        return True
    except Exception as e:  # a notification is never worth the daemon
        log.debug("sd_notify %r to %s failed: %s", state, os.environ.get("NOTIFY_SOCKET"), e)
        return False
