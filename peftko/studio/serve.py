"""`peftko studio`: check the address, print the URL once, serve until Ctrl-C (a training goes on)."""

from __future__ import annotations

import ipaddress
import secrets
import socket

import uvicorn

from peftko.core.errors import UserError
from peftko.studio.app import Studio
from peftko.studio.sandbox import Root


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(root: str, host: str, port: int, token: str | None) -> None:
    folder = Root(root)
    loopback = is_loopback(host)
    if not loopback and not token:
        token = secrets.token_urlsafe(18)  # off the loopback, every request must carry it
    _check_port(host, port)
    studio = Studio(folder, token=token, loopback=loopback)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"peftko studio: {url}", flush=True)
    print(f"root: {folder.path} (the studio reads and writes only below it; Ctrl-C stops the studio, "
          "not a training it started)", flush=True)
    if not loopback:
        print("bound off the loopback: anyone who can reach this address and has the token can train here",
              flush=True)
    uvicorn.run(studio.app(), host=host.strip("[]"), port=port, log_level="warning", access_log=False,
                lifespan="off", ws="none", server_header=False)


def _check_port(host: str, port: int) -> None:
    """A clear line, not uvicorn's traceback, when the port is taken or the address is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
