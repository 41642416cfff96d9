"""Sending webhooks over HTTP(S) without letting a URL reach inside the network.

A target's name is resolved **once**; every address it resolves to must be public
(not private, loopback, link-local, unspecified, multicast, reserved or otherwise
non-global — IPv4-mapped IPv6 addresses are judged by their IPv4 address), unless the
operator allows private targets. The connection then goes to the address that was
checked, with the name kept for the ``Host`` header and for TLS (SNI and certificate
check), so DNS cannot answer differently between the check and the connect
(rebinding). Redirects are never followed (``http.client`` does not follow them; a 3xx
is a failed attempt), and only the headers the caller gives are sent.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
#: How much of an answer's body is kept (for the deliveries list).
ANSWER_EXCERPT = 512


class TargetRefused(Exception):
    """The URL is not acceptable (scheme, credentials, or a non-public address)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    address: IPAddress


@dataclass(frozen=True)
class Answer:
    status: int
    excerpt: str


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is on the public internet. IPv6 forms that carry an IPv4
    address (mapped, 6to4, NAT64) are judged by that address too."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not address.is_multicast


def parse(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path-and-query)`` of an http(s) URL without credentials."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"url must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise TargetRefused("url is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("url must be http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("url must not carry credentials")
    host = parts.hostname
    if not host:
        raise TargetRefused("url has no host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path


def resolve(url: str, *, allow_private: bool) -> Target:
    """Resolve ``url``'s host once and check every address; the address to connect to."""
    scheme, host, port, path = parse(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"cannot resolve {host}: {exc}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise TargetRefused(f"cannot resolve {host}")
    if not allow_private:
        refused = [str(a) for a in addresses if not is_public(a)]
        if refused:
            raise TargetRefused(
                f"{host} resolves to a non-public address ({', '.join(refused)}); "
                "private, loopback and link-local targets are refused"
            )
    return Target(scheme, host, port, path, addresses[0])


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = str(target.address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(
            target.host, target.port, timeout=timeout, context=ssl.create_default_context()
        )
        self._address = str(target.address)

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # SNI and the certificate check are for the name, not the address.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    timeout: float,
) -> Answer:
    """POST ``body`` to ``url`` (checked as :func:`resolve` says, connected to the
    checked address). Raises :class:`TargetRefused` or an ``OSError`` /
    ``http.client.HTTPException`` when no answer came."""
    target = resolve(url, allow_private=allow_private)
    conn: http.client.HTTPConnection = (
        _PinnedHTTPS(target, timeout) if target.scheme == "https" else _PinnedHTTP(target, timeout)
    )
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        excerpt = response.read(ANSWER_EXCERPT).decode("utf-8", "replace")
        return Answer(response.status, excerpt)
    finally:
        conn.close()
