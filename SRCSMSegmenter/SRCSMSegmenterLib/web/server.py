"""``srcsm web``: check where the page may listen, then serve it.

The page can read and write the data folder and start processes, and it has no login: so it listens on
the loopback interface only, unless the user passes ``--allow-remote`` (then anyone who can reach the
port can use it — put it behind an authenticating proxy). Checked before trame is even imported, so a
refused host costs nothing.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from ..errors import InputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_host(host: str, allow_remote: bool) -> None:
    if not host:
        raise InputError("--host is empty. Use 127.0.0.1 (this computer only), or an interface with --allow-remote.")
    if not allow_remote and not is_loopback(host):
        raise InputError(
            f"Refusing to listen on '{host}': that would let other computers use this page, which reads and writes "
            f"the data folder and has no login. Use --host 127.0.0.1 (and an SSH tunnel to reach it from "
            f"elsewhere), or add --allow-remote if the network is trusted.")


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port} is not a TCP port. Use a number from 1024 to 65535 (0: any free port).")


def import_app():
    """The trame application module, or an error that says how to install the ``web`` extra."""
    try:
        from . import app
    except ImportError as exc:
        raise InputError(
            f"The web front end needs the 'web' extra ({exc.name or exc}). Install it with "
            f"pip install -c constraints.txt -e \".[web]\" (trame-slicer, on slicer-core 5.11.0.6 and vtk 9.6.0)."
        ) from exc
    return app


def serve(data: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, allow_remote: bool = False,
          max_upload_mb: float = 512.0) -> int:
    """Build the page for ``data`` and serve it until interrupted (blocking)."""
    check_host(host, allow_remote)
    check_port(port)
    if not max_upload_mb > 0:
        raise InputError(f"--max-upload-mb {max_upload_mb} must be positive.")
    app_module = import_app()
    from .datafolder import DataFolder

    folder = DataFolder(data, max_upload_bytes=int(max_upload_mb * 2**20))
    # trame parses sys.argv for its own options (--host, --port, --data…): give it none of ours.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        from trame.app import get_server

        web = app_module.SRCSMWebApp(folder, server=get_server("srcsm_web", client_type="vue3"))
        web.ctrl.on_server_ready.add(lambda **_: print(
            f"srcsm web: serving {folder.root} on http://{host}:{web.server.port}/ (Ctrl-C stops)",
            file=sys.stderr, flush=True))  # the real port, also when --port 0 let the system choose
        web.server.start(host=host, port=port, open_browser=False, timeout=0, show_connection_info=False)
    finally:
        sys.argv = argv
    return 0


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "check_host", "is_loopback", "serve"]
