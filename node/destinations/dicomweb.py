"""Kind "dicomweb": our result files by STOW-RS in one multipart/related POST (PS3.18 10.5), with
the outcome mapped onto retry or give-up.

HTTP 4xx (except 408 Request Timeout and 429 Too Many Requests) means the server will not take
these objects however often we ask: permanent. 5xx, 408, 429, connection errors and timeouts are
transient. A 200/202 answer whose Failed SOP Sequence is not empty is a failure too: transient
when every reason is "out of resources" (A7xx), permanent otherwise.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from vesalius.inference.fields import FieldError
from vesalius.node.checks import positive
from vesalius.node.destinations import DeliveryError, Destination, Outgoing, register

TRANSIENT_HTTP = {408, 429}
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"


def multipart_related(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """The body and Content-Type of a multipart/related message of application/dicom parts."""
    boundary = f"vesalius-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _endpoint(root: str) -> tuple[str, dict[str, str]]:
    """The STOW-RS URL (root + /studies) without credentials, and the headers carrying them."""
    parts = urllib.parse.urlsplit(root)
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return _without_credentials(root).rstrip("/") + "/studies", headers


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _failures(body: bytes) -> list[int]:
    """Failure reasons from a STOW-RS response's Failed SOP Sequence (empty when all were stored)."""
    try:
        answer = json.loads(body) if body.strip() else {}
    except ValueError:
        return []
    items = answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", []) if isinstance(answer, dict) else []
    reasons = []
    for item in items:
        value = item.get(FAILURE_REASON, {}).get("Value", [0xC000]) if isinstance(item, dict) else [0xC000]
        reasons.append(int(value[0]) if value else 0xC000)
    return reasons


@register
@dataclass(frozen=True)
class DicomwebDestination(Destination):
    """A DICOMweb server (its root, such as http://pacs/dicom-web) receiving our objects by STOW-RS;
    credentials in the URL's userinfo go as HTTP Basic auth."""

    kind: ClassVar[str] = "dicomweb"
    url: str
    timeout: float = 30.0  # s for the whole HTTP request

    @property
    def address(self) -> str:
        return _without_credentials(self.url)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", self.url):
            raise FieldError(f"url: expected the DICOMweb root as http(s)://host[:port]/path, "
                             f"got {_without_credentials(self.url)!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        positive("timeout", self.timeout)

    def send_objects(self, objects: Sequence[Outgoing], calling_ae: str) -> None:
        stow_rs(self.url, [o.data for o in objects], self.timeout)


def stow_rs(root: str, parts: Sequence[bytes], timeout: float) -> None:
    """POST the objects to ``root``/studies; raise DeliveryError unless all were stored."""
    url, headers = _endpoint(root)
    body, content_type = multipart_related(parts)
    request = urllib.request.Request(url, data=body, method="POST", headers={
        **headers, "Content-Type": content_type, "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read()
    except urllib.error.HTTPError as err:
        detail = "".join(c if c.isprintable() else " " for c in err.read()[:300].decode(errors="replace"))
        detail = detail.strip()  # the server's words, one line
        permanent = 400 <= err.code < 500 and err.code not in TRANSIENT_HTTP
        raise DeliveryError(f"STOW-RS to {url} answered HTTP {err.code} {err.reason}"
                            + (f": {detail}" if detail else ""), permanent=permanent) from err
    except (urllib.error.URLError, OSError) as err:  # refused, unreachable, timed out, reset
        reason = getattr(err, "reason", err)
        raise DeliveryError(f"STOW-RS to {url}: {reason}", permanent=False) from err
    reasons = _failures(answer)
    if reasons:
        codes = ", ".join(f"0x{r:04X}" for r in reasons)
        transient = all(r & 0xFF00 == 0xA700 for r in reasons)
        raise DeliveryError(f"STOW-RS to {url}: {len(reasons)} of {len(parts)} objects refused ({codes})",
                            permanent=not transient)
