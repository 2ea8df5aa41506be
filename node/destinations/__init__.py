"""Destinations: where results go, one registered kind per way of getting them there.

A kind is a frozen dataclass subclassing ``Destination`` with its own typed settings (checked by
their annotations and ``__post_init__``, as every configuration section is) and its ``send``.
``@register`` makes it known by its ``kind`` string; ``parse_destination`` picks the class from a
table's ``kind`` key and builds it with ``inference.fields.from_table``. The built-in kinds
(``dicom``, ``dicomweb``, ``folder``) are registered when this package is imported.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pydicom
from pydicom.dataset import Dataset

from vesalius.inference.fields import FieldError, check_types, from_table, required_keys
from vesalius.node.checks import ConfigError, positive

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
    preview: bool = True  # the 3D preview images (Multi-frame True Color Secondary Capture)
    max_attempts: int | None = None  # delivery tries before "failed"; None: [retry] max_attempts
    # PS3.15 Basic Application Level Confidentiality Profile on what is sent (node/deidentify.py)
    deidentify: str = ""  # "" or "basic"
    deidentify_options: tuple[str, ...] = ()  # from DEIDENTIFY_OPTIONS

    TABLE_KEYS: ClassVar[frozenset[str]] = frozenset()  # table keys that are not fields (``prepare``)

    def __post_init__(self) -> None:
        check_types(self)
        if self.max_attempts is not None:
            positive("max_attempts", self.max_attempts)
        if self.deidentify not in DEIDENTIFY_PROFILES:
            raise FieldError(f"deidentify: expected \"basic\" (or \"\" for none), got {self.deidentify!r}")
        for option in self.deidentify_options:
            if option not in DEIDENTIFY_OPTIONS:
                raise FieldError(f"deidentify_options: unknown option {option!r} "
                                 f"(known: {', '.join(DEIDENTIFY_OPTIONS)})")
        if self.deidentify_options and not self.deidentify:
            raise FieldError("deidentify_options: only with deidentify = \"basic\"")

    @property
    @abstractmethod
    def address(self) -> str:
        """Where it sends, for log lines and listings; never credentials."""

    @property
    def label(self) -> str:
        """``name (kind address)``, e.g. ``PACS (dicom PACS@10.0.0.5:104)``."""
        return f"{self.name} ({self.kind} {self.address})"

    @classmethod
    def own_keys(cls) -> frozenset[str]:
        """The table keys of this kind that other kinds do not have."""
        common = {f.name for f in fields(Destination)}
        return frozenset({f.name for f in fields(cls)} - common) | cls.TABLE_KEYS

    @classmethod
    def prepare(cls, table: dict[str, Any], base: Path | None) -> dict[str, Any]:
        """The table as the fields take it: defaults that depend on other keys, relative paths
        from ``base``, nested settings from flat keys. The default: the table as it is."""
        return table

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


def parse_destination(key: str, table: Any, base: Path | None = None) -> Destination:
    """The destination of one ``[[destinations]]`` table, by its ``kind`` (default "dicom"); a key
    that belongs to another kind says which."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table, got {table!r}")
    kind = table.get("kind", "dicom")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(f"{key}.kind: expected one of {', '.join(sorted(KINDS))}, got {kind!r}")
    cls = KINDS[kind]
    for name in table:
        owners = [k for k, c in sorted(KINDS.items()) if name in c.own_keys() and c is not cls]
        if owners and name not in cls.own_keys():
            kinds = " or ".join(f'kind = "{k}"' for k in owners)
            raise ConfigError(f"{key}.{name}: only for {kinds} "
                              f"(kind = \"{cls.kind}\" has {', '.join(sorted(cls.own_keys()))})")
    try:
        values = cls.prepare({k: v for k, v in table.items() if k != "kind"}, base)
        for name in sorted(required_keys(cls), key=lambda n: n == "name"):  # a kind's own keys first
            if name not in values:
                raise FieldError(f'{name}: required for kind = "{kind}"')
        return from_table(cls, values)
    except FieldError as err:
        raise ConfigError(f"{key}{err}" if str(err).startswith(":") else f"{key}.{err}") from None


from vesalius.node.destinations import dicom, dicomweb, folder  # noqa: E402, F401  (registers them)
