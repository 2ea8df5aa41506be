"""DICOMweb STOW-RS client: our result files to a destination of kind "dicomweb" in one
multipart/related POST (PS3.18 10.5), with the outcome mapped onto retry or give-up.

HTTP 4xx (except 408 Request Timeout and 429 Too Many Requests) means the server will not take
these objects however often we ask: permanent. 5xx, 408, 429, connection errors and timeouts are
transient. A 200/202 answer whose Failed SOP Sequence is not empty is a failure too: transient
when every reason is "out of resources" (A7xx), permanent otherwise.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from vesalius.node.config import Destination
from vesalius.node.send import DeliveryError

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
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts).rstrip("/") + "/studies", headers


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


def stow_rs(destination: Destination, files: Sequence[Path]) -> None:
    """POST the files to ``destination.url``/studies; raise DeliveryError unless all were stored."""
    url, headers = _endpoint(destination.url)
    body, content_type = multipart_related([Path(f).read_bytes() for f in files])
    request = urllib.request.Request(url, data=body, method="POST", headers={
        **headers, "Content-Type": content_type, "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(request, timeout=destination.timeout) as response:
            answer = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode(errors="replace").strip()
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
        raise DeliveryError(f"STOW-RS to {url}: {len(reasons)} of {len(files)} objects refused ({codes})",
                            permanent=not transient)
