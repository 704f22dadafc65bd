"""Without API keys, only this machine's own programs may talk to Veil, not web pages.

Authentication off means loopback only, but a browser on this machine is on loopback
too: any web page it shows can send a "simple" cross-site POST (text/plain, a form)
to 127.0.0.1, and a page on a rebound DNS name (attacker.example resolving to
127.0.0.1) can even read the answers. So, while no keys are configured:

- the Host header must name a loopback address or `localhost` (DNS rebinding);
- a browser's Origin, when sent, must be a loopback one, and a request the browser
  marks `Sec-Fetch-Site: cross-site` is refused (cross-site requests);
- JSON bodies must be sent as `application/json`, which a page cannot send across
  sites without a CORS preflight that Veil never grants (checked by the handlers).

With keys, a page cannot send the key on its own, and none of this is needed.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from edge.openai_wire import ApiError

__all__ = ["is_local_name", "refuse_cross_site"]


def is_local_name(host: str) -> bool:
    """`localhost`, a name under it, or a loopback IP (IPv6 with or without brackets)."""
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_part(host_header: str) -> str:
    """The name of a Host header value, without its port."""
    return urlsplit(f"//{host_header}").hostname or ""


def refuse_cross_site(request: web.Request) -> None:
    """Raise a 403 for a request a web page may have made (see the module's doc)."""
    host = request.headers.get("Host")
    if host is not None and not is_local_name(_host_part(host)):
        raise _forbidden(f"the Host header names {_host_part(host)!r}, not this machine")
    origin = request.headers.get("Origin")
    if origin is not None and not is_local_name(urlsplit(origin).hostname or ""):
        raise _forbidden(f"a page from {origin[:200]!r} sent it")
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise _forbidden("the browser marks it as cross-site")


def _forbidden(why: str) -> ApiError:
    return ApiError(
        403,
        f"Refused: {why}. With authentication off (no API keys), Veil answers only "
        "programs on this machine, never web pages; configure API keys to serve others.",
        type="permission_error",
        code="cross_site_refused",
    )
