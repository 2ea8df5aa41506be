"""Kind "folder": the objects written durably into a local folder, for air-gapped sites (a folder
another system picks up or a removable disk) and for tests.

Layout: ``<path>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. Names come from the UIDs only when they
are digits and dots, and every target is checked to resolve inside ``path``; a re-delivery
replaces the file (our result UIDs are deterministic).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vesalius.inference.fields import FieldError
from vesalius.node.checks import ConfigError
from vesalius.node.destinations import DeliveryError, Destination, Outgoing, register
from vesalius.node.store import write_durably

UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def uid_name(dataset: Any, keyword: str) -> str:
    """A UID of the dataset as a file or folder name; DeliveryError when it is not a plain UID."""
    value = str(dataset.get(keyword, "") or "")
    if len(value) > 64 or not UID.fullmatch(value):
        raise DeliveryError(f"{keyword} is missing or not a valid UID: not written", permanent=True)
    return value


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refused unless it resolves inside ``root`` (symbolic links included)."""
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DeliveryError(f"{relative} would leave the destination folder: not written", permanent=True)
    return target


@register
@dataclass(frozen=True)
class FolderDestination(Destination):
    """A local folder; relative paths start at the working directory (as data_dir does)."""

    kind: ClassVar[str] = "folder"
    path: Path

    @property
    def address(self) -> str:
        return str(self.path)

    @classmethod
    def prepare(cls, table: dict[str, Any], base: Path | None) -> dict[str, Any]:
        if isinstance(table.get("path"), str) and not table["path"].strip():
            raise FieldError("path: must not be empty")
        return table

    def check(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"destination {self.name}: path {self.path} exists and is not a folder")

    def send_objects(self, objects: Sequence[Outgoing], calling_ae: str) -> None:
        targets = [inside(self.path, f"{uid_name(o.dataset, 'StudyInstanceUID')}/"
                                     f"{uid_name(o.dataset, 'SOPInstanceUID')}.dcm") for o in objects]
        for target, item in zip(targets, objects, strict=True):
            write_durably(target, item.data)
