"""A Query/Retrieve SCP as a source: C-FIND (Study Root) at study, series and image level, then
C-MOVE to the node's own AE title (the instances arrive through the node's C-STORE listener,
node.receive) or C-GET (they arrive on our association and are stored through node.ingest).

One association per exchange: a source that drops or refuses one fails only that study.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from vesalius.node import ingest, pdu_limits
from vesalius.node.pull.query import PullQuery, SeriesMatch, StudyMatch, clean_uid
from vesalius.node.receive import SpoolFile, discard_partial_data_set
from vesalius.node.sources import DimseSource
from vesalius.node.store import Store

log = logging.getLogger("vesalius.pull")

PENDING = (0xFF00, 0xFF01)
# Statuses a Q/R SCP answers (PS3.4 C.4.2.1.5, C.4.3.1.4), in words for a study's failure reason.
STATUS_WORDS = {0xA701: "out of resources (matches)", 0xA702: "out of resources (sub-operations)",
                0xA801: "move destination unknown", 0xA900: "identifier does not match SOP class",
                0xFE00: "cancelled", 0xB000: "some sub-operations failed", 0x0122: "SOP class not supported",
                0x0124: "not authorized"}


class SourceError(Exception):
    """The source could not be asked or refused; the message says why (no patient data)."""


def status_text(status: int) -> str:
    words = STATUS_WORDS.get(status) or ("unable to process" if status & 0xF000 == 0xC000 else "failed")
    return f"{words} (0x{status:04X})"


class DimseClient:
    """Queries and retrieves from one ``DimseSource`` as ``calling_ae``; C-MOVE names
    ``move_destination`` (the node's AE title unless the source configures another)."""

    def __init__(self, source: DimseSource, node_ae_title: str, max_instance_bytes: int = 0) -> None:
        self.source = source
        self.max_instance_bytes = max_instance_bytes  # C-GET: a larger data set closes the association
        self.calling_ae = source.calling_ae or node_ae_title
        self.move_destination = source.move_destination or node_ae_title
        self.whole_series = True  # one series-level C-MOVE/C-GET retrieves a series at once
        self.through_listener = source.retrieve != "get"  # C-MOVE: the source's C-STOREs to the listener
        self._open: set[Association] = set()
        self._lock = threading.Lock()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.source.timeout
        ae.connection_timeout = self.source.timeout
        return ae

    def _associate(self, ae: AE, **kwargs: Any) -> Association:
        source = self.source
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, **kwargs)
        if not assoc.is_established:
            why = ("rejected the association" if assoc.is_rejected else
                   f"could not be reached or did not answer within {source.timeout:g} s")
            raise SourceError(f"{source.address} {why}")
        with self._lock:
            self._open.add(assoc)
        return assoc

    def _done(self, assoc: Association) -> None:
        with self._lock:
            self._open.discard(assoc)
        if assoc.is_established:
            assoc.release()

    def close(self) -> None:
        """Abort the associations still open (the node is stopping): a retrieval cut short is
        taken up at the next start."""
        with self._lock:
            open_now = list(self._open)
        for assoc in open_now:
            assoc.abort()

    def _find(self, identifier: Dataset) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        found: list[Dataset] = []
        try:
            for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                if not status or "Status" not in status:
                    raise SourceError(f"{self.source.address}: C-FIND got no answer in "
                                      f"{self.source.timeout:g} s")
                code = int(status.Status)
                if code in PENDING and answer is not None:
                    found.append(answer)
                elif code not in PENDING and code != 0:
                    raise SourceError(f"{self.source.address}: C-FIND {status_text(code)}")
        finally:
            self._done(assoc)
        return found

    def studies(self, query: PullQuery) -> list[StudyMatch]:
        """The studies matching ``query``, each with the series it lists."""
        found: dict[str, StudyMatch] = {}
        for uid in query.study_uids or ("",):  # one C-FIND per UID: list matching is optional
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = uid
            ds.StudyDate = query.date_range()
            ds.StudyDescription = query.study_description
            ds.AccessionNumber = query.accession_number
            ds.PatientID = query.patient_id
            for answer in self._find(ds):
                if (match := StudyMatch.from_answer(answer)) is not None:
                    found[match.study_uid] = match
        return [replace(s, series=tuple(self.series(s.study_uid))) for s in found.values()]

    def series(self, study_uid: str) -> list[SeriesMatch]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        for keyword in ("SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription",
                        "NumberOfSeriesRelatedInstances"):
            setattr(ds, keyword, "")
        found = []
        for answer in self._find(ds):
            if (match := SeriesMatch.from_answer(answer)) is not None:
                found.append(match)
        return found

    def instances(self, study_uid: str, series_uid: str) -> list[str]:
        """The SOP Instance UIDs of one series, as the source lists them."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ""
        return sorted({uid for a in self._find(ds) if (uid := clean_uid(a.get("SOPInstanceUID")))})

    def retrieve(self, store: Store, study_uid: str, series_uid: str, sop_uids: list[str] | None,
                 min_free_bytes: int = 0) -> None:
        """Fetch a series (``sop_uids`` None) or these of its instances; SourceError unless the
        source reports every sub-operation done."""
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.QueryRetrieveLevel = "SERIES"
        if sop_uids is not None:
            ds.QueryRetrieveLevel = "IMAGE"
            ds.SOPInstanceUID = sop_uids[0] if len(sop_uids) == 1 else sop_uids
        if self.source.retrieve == "get":
            self._get(ds, store, min_free_bytes)
        else:
            self._move(ds)

    def _move(self, identifier: Dataset) -> None:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae)
        try:
            responses = assoc.send_c_move(identifier, self.move_destination,
                                          StudyRootQueryRetrieveInformationModelMove)
            self._final(responses, "C-MOVE")
        finally:
            self._done(assoc)

    def _get(self, identifier: Dataset, store: Store, min_free_bytes: int) -> None:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        pdu_limits.install()
        pdu_limits.set_max_dataset_bytes(ae, self.max_instance_bytes)  # as the listener bounds C-STORE
        contexts = StoragePresentationContexts[:127 - 1]  # 128 contexts at most, one is C-GET's
        roles = []
        for context in contexts:
            assert context.abstract_syntax is not None
            ae.add_requested_context(context.abstract_syntax)
            roles.append(build_role(context.abstract_syntax, scp_role=True))
        refused: list[str] = []

        def on_store(event: evt.Event) -> int:
            outcome = store_received(event, store, self.source.ae_title, min_free_bytes)
            if outcome.status != ingest.SUCCESS:
                refused.append(outcome.problem)
            return outcome.status

        def on_close(event: evt.Event) -> None:  # cut short (max_instance_mb, a drop): no half file left
            discard_partial_data_set(event.assoc)

        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store),
                                                                 (evt.EVT_CONN_CLOSE, on_close)])
        try:
            self._final(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet), "C-GET")
        finally:
            self._done(assoc)
        if refused:
            raise SourceError(f"{len(refused)} instance(s) refused: {refused[0]}")

    def _final(self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str) -> None:
        """Read the answers to the end; SourceError unless the last says every sub-operation succeeded."""
        final: Dataset | None = None
        for status, _ in responses:
            if not status or "Status" not in status:
                raise SourceError(f"{self.source.address}: {what} got no answer in {self.source.timeout:g} s")
            final = status
        if final is None:
            raise SourceError(f"{self.source.address}: {what} got no answer")
        code = int(final.Status)
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        if code != 0 or failed:
            raise SourceError(f"{self.source.address}: {what} {status_text(code)}"
                              + (f", {failed} sub-operation(s) failed" if failed else ""))


def store_received(event: evt.Event, store: Store, source_ae: str, min_free_bytes: int) -> ingest.Ingested:
    """A C-STORE on our C-GET association, checked and stored as node.receive does."""
    spool_file = getattr(event.request, "_dataset_file", None)
    command_class = str(event.request.AffectedSOPClassUID)
    encapsulated = bool(event.context.transfer_syntax.is_encapsulated)
    try:
        if isinstance(spool_file, SpoolFile):  # the node streams data sets into its spool
            spool_file.close()
            path = Path(event.dataset_path)
            if spool_file.error is not None:
                path.unlink(missing_ok=True)
                return ingest.Ingested(ingest.OUT_OF_RESOURCES, f"could not store: {spool_file.error}")
        else:
            with tempfile.NamedTemporaryFile(dir=store.incoming_dir, suffix=".dcm", delete=False) as f:
                path = Path(f.name)
            ds = event.dataset
            ds.file_meta = event.file_meta
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
        ds = pydicom.dcmread(path, defer_size=ingest.HEADER_DEFER_SIZE)
    except Exception as err:  # an unparsable data set must not end the association
        return ingest.Ingested(ingest.CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(err).__name__})")
    return ingest.store_checked(store, ds, path, command_class, encapsulated, source_ae, min_free_bytes)
