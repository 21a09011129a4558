"""HTTP plumbing for the client: a session that binds a source address, ignores proxies, and reads
bounded bodies. Nothing here knows about maintenance events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from guest_sdk.errors import ProtocolError

# Every request passes these so that neither HTTP(S)_PROXY/ALL_PROXY in the environment nor proxies set on
# a session handed in by the caller route a metadata request elsewhere: the service identifies the droplet
# by the TCP source address, which a proxy would replace with its own.
NO_PROXIES: dict[str, str | None] = {"http": None, "https": None, "all": None}


class SourceAddressAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections are bound to one local address (any free port).

    On a multi-homed droplet this picks the interface whose address the metadata service knows; tests use
    it to give each simulated droplet its own ``127.0.0.N``.
    """

    def __init__(self, source_address: str, **kwargs: Any) -> None:
        self._source_address = (source_address, 0)
        super().__init__(**kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["source_address"] = self._source_address
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs["source_address"] = self._source_address
        return super().proxy_manager_for(proxy, **proxy_kwargs)


class NoRedirectSession(requests.Session):
    """A session that never even looks at a redirect.

    ``allow_redirects=False`` alone is not enough: ``requests`` still prepares the would-be next request and,
    to do so, reads the whole 3xx body, bypassing the size cap. Here a 3xx is just an answer.
    """

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


def build_session(source_address: str | None, user_agent: str) -> requests.Session:
    """A session for the client to own: no environment (proxies, .netrc, CA variables), no urllib3 retries."""
    session = NoRedirectSession()
    session.trust_env = False
    session.headers["User-Agent"] = user_agent
    # Bodies are tiny; asking for identity keeps a compressed body from inflating past the size cap.
    session.headers["Accept-Encoding"] = "identity"
    if source_address is not None:
        mount_source_address(session, source_address)
    return session


def mount_source_address(session: requests.Session, source_address: str) -> None:
    """Bind every new connection of ``session`` to ``source_address``."""
    adapter = SourceAddressAdapter(source_address)
    session.mount("http://", adapter)
    session.mount("https://", adapter)


@dataclass(frozen=True)
class Reply:
    """A fully read, size-checked HTTP answer."""

    status: int
    headers: requests.structures.CaseInsensitiveDict[str]
    body: bytes
    url: str

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    def text(self) -> str:
        """The body as UTF-8 text; :class:`ProtocolError` for bytes that are not text."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{self.url}: body is not UTF-8 text ({len(self.body)} bytes)") from e
        if any(ord(c) < 0x20 and c not in "\t\r\n" for c in text) or "\x7f" in text:
            raise ProtocolError(f"{self.url}: body contains control characters ({len(self.body)} bytes)")
        return text


def read_reply(response: requests.Response, max_bytes: int) -> Reply:
    """Read ``response`` (opened with ``stream=True``) to the end, refusing more than ``max_bytes``.

    Connection errors while reading (a server that closes mid-body) propagate as ``requests`` exceptions so
    the caller's retry policy sees them.
    """
    try:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
            raise ProtocolError(
                f"{response.url}: answer of {declared} bytes exceeds the {max_bytes}-byte cap"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=8192):
            size += len(chunk)
            if size > max_bytes:
                raise ProtocolError(f"{response.url}: answer exceeds the {max_bytes}-byte cap")
            chunks.append(chunk)
        return Reply(response.status_code, response.headers, b"".join(chunks), response.url)
    finally:
        response.close()
