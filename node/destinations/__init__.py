"""Destinations: where results go, one registered kind per way of getting them there.

A kind is a frozen dataclass subclassing ``Destination`` with its own typed settings, the parsing of
its ``[[destinations]]`` table (``from_table``) and its ``send``. ``@register`` makes it known by its
``kind`` string; ``parse_destination`` picks the class from a table's ``kind`` key. The built-in
kinds (``dicom``, ``dicomweb``, ``folder``) are registered when this package is imported.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pydicom
from pydicom.dataset import Dataset

from vesalius.node.checks import ConfigError, check_type, known, positive, strings

DEIDENTIFY_PROFILES = ("", "basic")  # "": send the objects as written
DEIDENTIFY_OPTIONS = ("retain_longitudinal_dates", "retain_patient_characteristics")


class DeliveryError(Exception):
    """A delivery that did not go through; ``permanent`` means retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Outgoing:
    """One result object as it leaves: its dataset and the Part 10 bytes of that dataset."""

    dataset: Dataset
    data: bytes


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of a dataset."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Destination(ABC):
    """What every kind shares: a name that rules refer to, which result objects it receives
    (see docs/outputs.md) and its number of delivery tries."""

    kind: ClassVar[str]
    name: str
    _: KW_ONLY
    labelmap: bool = False  # also the Label Map SEG (skipped where the peer does not accept it)
    encapsulated_stl: bool | tuple[str, ...] = False  # True: every structure; or these names
    surfaces: bool = True
    sr: bool = True
    max_attempts: int = 0  # delivery tries before "failed"; 0: [retry] max_attempts
    # PS3.15 Basic Application Level Confidentiality Profile on what is sent (node/deidentify.py)
    deidentify: str = ""  # "" or "basic"
    deidentify_options: tuple[str, ...] = ()  # from DEIDENTIFY_OPTIONS

    COMMON_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"name", "kind", "labelmap", "encapsulated_stl", "surfaces", "sr", "max_attempts", "deidentify",
         "deidentify_options"})
    KEYS: ClassVar[frozenset[str]] = frozenset()  # the kind's own table keys

    @property
    @abstractmethod
    def address(self) -> str:
        """Where it sends, for log lines and listings; never credentials."""

    @property
    def label(self) -> str:
        """``name (kind address)``, e.g. ``PACS (dicom PACS@10.0.0.5:104)``."""
        return f"{self.name} ({self.kind} {self.address})"

    @classmethod
    @abstractmethod
    def from_table(cls, key: str, table: dict[str, Any], base: Path | None = None) -> Destination:
        """The destination a ``[[destinations]]`` table describes (ConfigError naming the key)."""

    @abstractmethod
    def send_objects(self, objects: Sequence[Outgoing], calling_ae: str) -> None:
        """Deliver the objects; raise DeliveryError when they did not all go through."""

    def check(self) -> None:  # noqa: B027  (optional for a kind, so not abstract)
        """Problems found only by loading files (certificates): ConfigError at start-up."""

    def transform(self, dataset: Dataset) -> Dataset:
        """The outgoing dataset as this kind sends it: return ``dataset`` itself when unchanged, a new
        dataset otherwise. (De-identification, which needs the node's pseudonym table, is applied
        to the files before ``send``: see node.send.)"""
        return dataset

    def outgoing(self, files: Sequence[Path]) -> list[Outgoing]:
        """The files read once and passed through ``transform``; re-encoded only when it changed them."""
        objects = []
        for path in files:
            data = Path(path).read_bytes()
            dataset = pydicom.dcmread(io.BytesIO(data))
            changed = self.transform(dataset)
            objects.append(Outgoing(changed, data if changed is dataset else encode(changed)))
        return objects

    def send(self, files: Sequence[Path], calling_ae: str = "VESALIUS") -> None:
        """Send these result files as ``calling_ae`` (the node's AE title, for kinds that use one)."""
        self.send_objects(self.outgoing(files), calling_ae)


KINDS: dict[str, type[Destination]] = {}
D = TypeVar("D", bound=type[Destination])


def register(cls: D) -> D:
    """Class decorator: make a destination kind known by its ``kind``."""
    if cls.kind in KINDS:
        raise ValueError(f"destination kind {cls.kind!r} registered twice")
    KINDS[cls.kind] = cls
    return cls


def common_settings(key: str, table: dict[str, Any], cls: type[Destination]) -> dict[str, Any]:
    """Check the table's keys against the kind's own and the common ones, and read the common
    settings; a key that belongs to another kind says which."""
    allowed = set(cls.KEYS | Destination.COMMON_KEYS)
    for name in table:
        if name not in allowed:
            owners = [k for k, c in sorted(KINDS.items()) if name in c.KEYS]
            if owners:
                kinds = " or ".join(f'kind = "{k}"' for k in owners)
                raise ConfigError(f"{key}.{name}: only for {kinds} "
                                  f"(kind = \"{cls.kind}\" has {', '.join(sorted(cls.KEYS))})")
            known(key, table, allowed)
    values: dict[str, Any] = {}
    if "name" in table:
        values["name"] = check_type(f"{key}.name", table["name"], str)
    if "max_attempts" in table:
        attempts = check_type(f"{key}.max_attempts", table["max_attempts"], int)
        values["max_attempts"] = int(positive(f"{key}.max_attempts", attempts))
    for name in ("labelmap", "surfaces", "sr"):
        if name in table:
            values[name] = check_type(f"{key}.{name}", table[name], bool)
    if "encapsulated_stl" in table:
        value = table["encapsulated_stl"]
        values["encapsulated_stl"] = value if isinstance(value, bool) else strings(
            f"{key}.encapsulated_stl", value)
    if "deidentify" in table:
        profile = check_type(f"{key}.deidentify", table["deidentify"], str)
        if profile not in DEIDENTIFY_PROFILES:
            raise ConfigError(f"{key}.deidentify: expected \"basic\" (or \"\" for none), got {profile!r}")
        values["deidentify"] = profile
    if "deidentify_options" in table:
        options = strings(f"{key}.deidentify_options", table["deidentify_options"])
        for option in options:
            if option not in DEIDENTIFY_OPTIONS:
                raise ConfigError(f"{key}.deidentify_options: unknown option {option!r} "
                                  f"(known: {', '.join(DEIDENTIFY_OPTIONS)})")
        if options and not values.get("deidentify"):
            raise ConfigError(f"{key}.deidentify_options: only with deidentify = \"basic\"")
        values["deidentify_options"] = options
    return values


def require(key: str, table: dict[str, Any], names: Sequence[str], kind: str) -> None:
    for name in names:
        if name not in table:
            raise ConfigError(f'{key}.{name}: required for kind = "{kind}"')


def parse_destination(key: str, table: Any, base: Path | None = None) -> Destination:
    """The destination of one ``[[destinations]]`` table, by its ``kind`` (default "dicom")."""
    check_type(key, table, dict)
    kind = check_type(f"{key}.kind", table.get("kind", "dicom"), str)
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind: expected one of {', '.join(sorted(KINDS))}, got {kind!r}")
    return KINDS[kind].from_table(key, table, base)


from vesalius.node.destinations import dicom, dicomweb, folder  # noqa: E402, F401  (registers them)
