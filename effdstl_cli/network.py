"""Whether the network is there: a cheap probe before a download (datasets, hub weights), so an
offline machine fails in a second with one line instead of a library's minute of retries."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse


def online(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """Whether a download from ``host`` can start: False at once under EFFDSTL_OFFLINE=1.

    A cheap TCP connect (to the proxy when one is set) run in a thread, so a hanging DNS lookup
    cannot stall us past ``timeout``; this replaces library retry loops that take ~50 s offline.
    """
    if os.environ.get("EFFDSTL_OFFLINE", "") not in ("", "0"):
        return False
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)
