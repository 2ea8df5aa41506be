"""Sources: archives the node pulls studies from (``[[sources]]``; node.pull does the pulling).

Each kind is a frozen dataclass checked like every configuration section (``inference.fields``
types, ``__post_init__`` for the rest): ``dimse`` (C-FIND, then C-MOVE to our own AE title or
C-GET) and ``dicomweb`` (QIDO-RS, then WADO-RS). What they share is the pace of retrieval:
concurrent retrievals, instances per second and a time window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time as clock
from pathlib import Path
from typing import Any, ClassVar

from vesalius.inference.fields import FieldError, check_types, from_table
from vesalius.node.checks import ConfigError, ae_title, not_negative, one_of, port, positive

RETRIEVE_MODES = ("move", "get")
WINDOW = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
SOURCE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_window(text: str) -> tuple[clock, clock] | None:
    """``"22:00-06:00"`` as (start, end) local times (an end before the start wraps past
    midnight); "" as None (always). FieldError when it is neither."""
    if not text:
        return None
    match = WINDOW.fullmatch(text.strip())
    if match is None:
        raise FieldError(f'window: expected "HH:MM-HH:MM" (e.g. "22:00-06:00") or "", got {text!r}')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    try:
        start, end = clock(h1, m1), clock(h2, m2)
    except ValueError:
        raise FieldError(f"window: {text!r} is not a time of day range") from None
    if start == end:
        raise FieldError(f"window: {text!r} is empty (start and end are the same)")
    return start, end


def in_window(window: tuple[clock, clock] | None, now: clock) -> bool:
    """Whether ``now`` (local time of day) lies in the window [start, end)."""
    if window is None:
        return True
    start, end = window
    return start <= now < end if start < end else now >= start or now < end


@dataclass(frozen=True)
class Source:
    """What every kind shares: its name (``vesalius pull NAME``) and the pace of retrieval."""

    kind: ClassVar[str]
    name: str
    timeout: float = 30.0  # s for one network exchange (association, answer, HTTP request)
    max_concurrent: int = 1  # studies retrieved at the same time
    instances_per_second: float = 0.0  # average retrieval rate; 0: as fast as the source sends
    window: str = ""  # local time of day retrieval may start, e.g. "22:00-06:00"; "": always

    def __post_init__(self) -> None:
        check_types(self)
        if not SOURCE_NAME.fullmatch(self.name):
            raise FieldError(f"name: 1-64 letters, digits, '.', '_' or '-', got {self.name!r}")
        positive("timeout", self.timeout)
        positive("max_concurrent", self.max_concurrent)
        not_negative("instances_per_second", self.instances_per_second)
        parse_window(self.window)

    @property
    def address(self) -> str:
        """Where it is, for logs and listings; never credentials."""
        raise NotImplementedError


@dataclass(frozen=True)
class DimseSource(Source):
    """A Query/Retrieve SCP (PACS, VNA, Orthanc, dcmqrscp), Study Root information model."""

    kind: ClassVar[str] = "dimse"
    ae_title: str = ""
    host: str = ""
    port: int = 104
    retrieve: str = "move"  # move: the source sends to move_destination by C-STORE; get: C-GET
    move_destination: str = ""  # the AE title the source knows us by; "": the node's ae_title
    calling_ae: str = ""  # our AE title in the query association; "": the node's ae_title

    def __post_init__(self) -> None:
        super().__post_init__()
        ae_title("ae_title", self.ae_title)
        if not self.host:
            raise FieldError("host: required for kind = \"dimse\"")
        port("port", self.port)
        one_of("retrieve", self.retrieve, RETRIEVE_MODES)
        for name in ("move_destination", "calling_ae"):
            if getattr(self, name):
                ae_title(name, getattr(self, name))

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomwebSource(Source):
    """A DICOMweb server's root (QIDO-RS and WADO-RS under it), e.g. http://pacs/dicom-web;
    credentials in the URL's userinfo go as HTTP Basic auth."""

    kind: ClassVar[str] = "dicomweb"
    url: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", self.url):
            raise FieldError("url: expected the DICOMweb root as http(s)://host[:port]/path")
        object.__setattr__(self, "url", self.url.rstrip("/"))

    @property
    def address(self) -> str:
        return re.sub(r"//[^@/]*@", "//", self.url)


KINDS: dict[str, type[Source]] = {"dimse": DimseSource, "dicomweb": DicomwebSource}


def parse_source(key: str, table: Any, base: Path | None = None) -> Source:
    """The source of one ``[[sources]]`` table, by its ``kind`` (default "dimse")."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table, got {table!r}")
    kind = table.get("kind", "dimse")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(f"{key}.kind: expected one of {', '.join(sorted(KINDS))}, got {kind!r}")
    try:
        return from_table(KINDS[kind], {k: v for k, v in table.items() if k != "kind"}, key)
    except FieldError as err:
        raise ConfigError(str(err)) from None
