"""A DICOMweb server as a source: QIDO-RS to query, WADO-RS to retrieve, with ``dicomweb-client``.

Each instance is retrieved on its own (the pace counts instances, and one is in memory at a
time), written into the spool's incoming folder and stored through node.ingest, the checks and
durability of C-STORE.
"""

from __future__ import annotations

import base64
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from vesalius.node import ingest
from vesalius.node.pull.dimse import SourceError
from vesalius.node.pull.query import PullQuery, SeriesMatch, StudyMatch, clean_uid
from vesalius.node.sources import DicomwebSource
from vesalius.node.store import Store

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyDescription")
SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances")


class TooLarge(requests.RequestException):
    """An answer announced (Content-Length) larger than the node takes for one instance."""


def _bounded_session(max_bytes: int) -> requests.Session:
    """A session refusing an answer over ``max_bytes``: before reading it when its Content-Length
    says so, else as soon as that many bytes came (requests runs response hooks before it reads a
    body, and reads it through ``raw.stream``, which the hook wraps with a count)."""
    session = requests.Session()

    def check(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if not max_bytes:
            return
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            response.close()
            raise TooLarge(f"an answer of {int(length) // 2**20} MB is larger than max_instance_mb")
        stream = getattr(response.raw, "stream", None)
        if stream is None:
            return

        def counted(*args: Any, **kwargs: Any) -> Iterator[bytes]:
            total = 0
            for chunk in stream(*args, **kwargs):
                total += len(chunk)
                if total > max_bytes:
                    response.close()
                    raise TooLarge(f"an answer of more than {max_bytes // 2**20} MB is larger than "
                                   "max_instance_mb")
                yield chunk

        response.raw.stream = counted

    session.hooks["response"].append(check)
    return session


def _client(source: DicomwebSource, max_bytes: int = 0) -> DICOMwebClient:
    """A client for the source's root; userinfo in the URL becomes Basic auth, not part of the URL."""
    parts = urllib.parse.urlsplit(source.url)
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        secret = urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return DICOMwebClient(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), headers=headers,
                          timeout=source.timeout, session=_bounded_session(max_bytes))


def _dataset(answer: dict[str, Any]) -> Dataset:
    return Dataset.from_json(answer)


class DicomwebClient:
    def __init__(self, source: DicomwebSource, max_instance_bytes: int = 0) -> None:
        self.source = source
        self.client = _client(source, max_instance_bytes)
        self.whole_series = False  # WADO-RS one instance at a time
        self.through_listener = False

    @contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """Every way a DICOMweb request fails, as one SourceError that names the request."""
        try:
            yield
        except TooLarge as err:
            raise SourceError(f"{self.source.address}: {what} refused: {err}") from None
        except requests.HTTPError as err:
            code = err.response.status_code if err.response is not None else "?"
            raise SourceError(f"{self.source.address}: {what} answered HTTP {code}") from None
        except requests.RequestException as err:
            raise SourceError(f"{self.source.address}: {what} failed ({type(err).__name__})") from None

    def _ask(self, what: str, call: Any, **kwargs: Any) -> list[Dataset]:
        with self._failures(what):
            return [_dataset(a) for a in call(**kwargs, get_remaining=True)]

    def studies(self, query: PullQuery) -> list[StudyMatch]:
        found: dict[str, StudyMatch] = {}
        for uid in query.study_uids or ("",):
            filters = {"StudyInstanceUID": uid, "StudyDate": query.date_range(),
                       "StudyDescription": query.study_description,
                       "AccessionNumber": query.accession_number, "PatientID": query.patient_id}
            answers = self._ask("QIDO-RS studies", self.client.search_for_studies, fields=list(STUDY_FIELDS),
                                search_filters={k: v for k, v in filters.items() if v})
            for answer in answers:
                if (match := StudyMatch.from_answer(answer)) is not None:
                    found[match.study_uid] = match
        return [replace(s, series=tuple(self.series(s.study_uid))) for s in found.values()]

    def series(self, study_uid: str) -> list[SeriesMatch]:
        found = []
        for answer in self._ask("QIDO-RS series", self.client.search_for_series,
                                study_instance_uid=study_uid, fields=list(SERIES_FIELDS)):
            if (match := SeriesMatch.from_answer(answer)) is not None:
                found.append(match)
        return found

    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        answers = self._ask("QIDO-RS instances", self.client.search_for_instances,
                            study_instance_uid=study_uid, series_instance_uid=series_uid,
                            fields=["SOPInstanceUID"])
        return sorted({uid for a in answers if (uid := clean_uid(a.get("SOPInstanceUID")))})

    def retrieve(self, store: Store, study_uid: str, series_uid: str, sop_uids: list[str] | None,
                 min_free_bytes: int = 0) -> None:
        """WADO-RS each instance, stored through node.ingest; SourceError at the first refusal."""
        for sop_uid in sop_uids if sop_uids is not None else self.instances(study_uid, series_uid):
            with self._failures("WADO-RS"):
                ds = self.client.retrieve_instance(study_uid, series_uid, sop_uid)
            with tempfile.NamedTemporaryFile(dir=store.incoming_dir, suffix=".dcm", delete=False) as f:
                path = Path(f.name)
            try:
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
            except Exception as err:  # not a storable data set: refused like an unreadable C-STORE
                path.unlink(missing_ok=True)
                raise SourceError(f"{self.source.address}: WADO-RS sent an instance that cannot be "
                                  f"written ({type(err).__name__})") from None
            outcome = ingest.store_file(store, path, f"dicomweb:{self.source.name}"[:64], min_free_bytes)
            if outcome.status != ingest.SUCCESS:
                raise SourceError(f"{self.source.address}: instance refused: {outcome.problem}")

    def close(self) -> None:
        """Nothing to end: each request ends by itself within ``timeout``."""
