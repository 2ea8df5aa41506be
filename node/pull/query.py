"""The query of a pull job, and what a source answered to it.

The source matches the study-level keys (date range, description, accession number, patient,
Study UIDs); the series-level filters (modality, body part, series description) are applied here
to the series each study lists, so a source that ignores a key it does not index cannot widen
the pull. ``level`` says what is pulled: every series of a matching study ("study", "patient"),
or only the matching series ("series").
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from vesalius.inference.fields import FieldError, check_types, from_table
from vesalius.node.checks import one_of
from vesalius.node.ingest import uid_problem

LEVELS = ("patient", "study", "series")
DATE = re.compile(r"\d{8}")
IDENTIFYING = ("accession_number", "patient_id")  # never shown back: JSON answers, logs, stdout


@dataclass(frozen=True)
class PullQuery:
    """What to pull; empty criteria match everything. Dates are YYYYMMDD, inclusive; the
    descriptions are DICOM wildcard patterns (``*`` and ``?``), matched case-insensitively."""

    level: str = "study"
    modality: tuple[str, ...] = ()
    date_from: str = ""
    date_to: str = ""
    study_description: str = ""
    series_description: str = ""
    body_part: tuple[str, ...] = ()
    accession_number: str = ""
    patient_id: str = ""
    study_uids: tuple[str, ...] = ()
    limit: int = 0  # at most this many studies (the oldest first); 0: all that match
    # cohort outputs (node.pull.cohort): the Series Description of the reference SEG in each study
    evaluate_against: str = ""

    def __post_init__(self) -> None:
        check_types(self)
        one_of("level", self.level, LEVELS)
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value and not is_date(value):
                raise FieldError(f"{name}: expected a date as YYYYMMDD, got {value!r}")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise FieldError(f"date_to: {self.date_to} is before date_from {self.date_from}")
        for i, uid in enumerate(self.study_uids):
            problem = uid_problem("StudyInstanceUID", uid)
            if problem:
                raise FieldError(f"study_uids[{i}]: {problem}")
        if self.level == "patient" and not self.patient_id:
            raise FieldError("patient_id: required for level = \"patient\"")
        if self.limit < 0:
            raise FieldError(f"limit: must be >= 0, got {self.limit}")
        object.__setattr__(self, "modality", tuple(m.upper() for m in self.modality))
        object.__setattr__(self, "body_part", tuple(b.upper() for b in self.body_part))
        for name in ("study_description", "series_description", "accession_number", "patient_id",
                     "evaluate_against"):
            if any(c in getattr(self, name) for c in "\\\x00\r\n"):
                raise FieldError(f"{name}: no backslash or control characters")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PullQuery:
        return from_table(cls, json.loads(text))

    def shown(self) -> dict[str, Any]:
        """The query as listings show it: the criteria that identify a patient only as given."""
        return {k: ("(given)" if k in IDENTIFYING and v else v) for k, v in asdict(self).items()
                if v not in ("", (), 0) or k == "level"}

    def date_range(self) -> str:
        """The StudyDate matching value: ``from-to``, ``from-``, ``-to`` or ""."""
        if not (self.date_from or self.date_to):
            return ""
        return f"{self.date_from}-{self.date_to}"

    def study_matches(self, study: StudyMatch) -> bool:
        """The source's answer checked again (a source may ignore keys it does not index)."""
        if self.study_uids and study.study_uid not in self.study_uids:
            return False
        if study.study_date and self.date_from and study.study_date < self.date_from:
            return False
        if study.study_date and self.date_to and study.study_date > self.date_to:
            return False
        return not (self.study_description and study.description
                    and not wildcard(self.study_description, study.description))

    def series_matches(self, series: SeriesMatch) -> bool:
        if self.modality and series.modality.upper() not in self.modality:
            return False
        if self.body_part and series.body_part.upper() not in self.body_part:
            return False
        return not (self.series_description
                    and not wildcard(self.series_description, series.description))

    def is_reference(self, series: SeriesMatch) -> bool:
        """A SEG series named by ``evaluate_against``."""
        return series.modality == "SEG" and wildcard(self.evaluate_against, series.description)

    def select(self, study: StudyMatch) -> StudyMatch | None:
        """The study with the series to pull, or None when it does not match."""
        if not self.study_matches(study):
            return None
        wanted = [s for s in study.series if self.series_matches(s)]
        if not wanted:
            return None
        pulled = wanted if self.level == "series" else study.series
        if self.evaluate_against and self.level == "series":  # the reference comes along
            pulled = [s for s in study.series if s in wanted or self.is_reference(s)]
        return StudyMatch(study.study_uid, study.study_date, study.description, tuple(pulled))


def is_date(text: str) -> bool:
    """YYYYMMDD, and a day of the calendar."""
    if not DATE.fullmatch(text):
        return False
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def wildcard(pattern: str, value: str) -> bool:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4): ``*`` any run, ``?`` one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value.strip(), re.IGNORECASE | re.DOTALL) is not None


def parse_query(table: dict[str, Any]) -> PullQuery:
    """A PullQuery from JSON or flags; FieldError names the offending key."""
    return from_table(PullQuery, table)


@dataclass(frozen=True)
class SeriesMatch:
    series_uid: str
    modality: str = ""
    body_part: str = ""
    description: str = ""
    instances: int | None = None  # as the source counts them, when it says

    @classmethod
    def from_answer(cls, answer: Any) -> SeriesMatch | None:
        """A series-level answer (a C-FIND data set or a QIDO-RS object read by keyword), cleaned;
        None when its UID is not one."""
        uid = clean_uid(answer.get("SeriesInstanceUID"))
        if uid is None:
            return None
        count = answer.get("NumberOfSeriesRelatedInstances")
        return cls(uid, clean_code(answer.get("Modality")), clean_code(answer.get("BodyPartExamined")),
                   str(answer.get("SeriesDescription", "") or ""),
                   int(count) if count not in (None, "") else None)


@dataclass(frozen=True)
class StudyMatch:
    study_uid: str
    study_date: str = ""
    description: str = ""
    series: tuple[SeriesMatch, ...] = field(default_factory=tuple)

    @classmethod
    def from_answer(cls, answer: Any) -> StudyMatch | None:
        """A study-level answer (C-FIND data set or QIDO-RS object read by keyword), cleaned, without
        its series yet; None when its UID is not one."""
        uid = clean_uid(answer.get("StudyInstanceUID"))
        if uid is None:
            return None
        return cls(uid, clean_date(answer.get("StudyDate")), str(answer.get("StudyDescription", "") or ""))

    def shown(self) -> dict[str, Any]:
        """For a dry run's listing: UIDs, date, modalities, counts; nothing that names a patient."""
        return {"study_instance_uid": self.study_uid, "study_date": self.study_date,
                "modalities": sorted({s.modality for s in self.series if s.modality}),
                "series": len(self.series),
                "instances": sum(s.instances or 0 for s in self.series)
                if all(s.instances is not None for s in self.series) else None}


def clean_date(value: Any) -> str:
    """A StudyDate a source answered, kept only when it is one (YYYYMMDD)."""
    text = str(value or "").strip()
    return text if is_date(text) else ""


def clean_code(value: Any) -> str:
    """A code string a source answered (Modality, BodyPartExamined), kept only when it is one."""
    text = str(value or "").strip().upper()
    return text if re.fullmatch(r"[A-Z0-9_ ]{1,16}", text) else ""


def clean_uid(value: Any) -> str | None:
    """A UID a source answered, or None when it is not one (such answers are skipped)."""
    text = str(value or "").rstrip("\x00 ")
    return None if uid_problem("UID", text) else text

