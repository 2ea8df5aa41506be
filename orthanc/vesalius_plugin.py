"""Vesalius plugin for Orthanc (orthanc-python 4.0 or later; standard library and ``orthanc`` only).

- Auto-forward: when a series becomes stable and matches the filter, it is sent by C-STORE to the
  Vesalius node (an Orthanc job, so Orthanc's own retry and job list apply).
- "Send to Vesalius": a button on the study and series pages of Orthanc Explorer, and the REST
  route ``POST /vesalius/send/{orthanc study or series id}`` behind it.
- Status: ``GET /vesalius/status/{orthanc study or series id}`` shows what the plugin decided for
  each series of the study and what the node received, ran and delivered for it; the study page
  of Orthanc Explorer shows the node's jobs for the study, each linked to its page on the node's
  dashboard.

Never sent, by either path: the node's own outputs (Manufacturer "Vesalius"), SEG, Surface
Segmentation, SR, RT, encapsulated documents and presentation states, and derived images, so no
loop can form with a node that sends its results back into the same Orthanc.

Settings: the "Vesalius" section of the Orthanc configuration (see docs/orthanc.md).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orthanc

VESALIUS_MANUFACTURER = "Vesalius"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SURFACE_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.5"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# Families of non-image (or derived-by-nature) SOP classes: segmentation/registration/fiducials,
# structured reports, RT, encapsulated documents (PDF, CDA, STL), presentation states.
NEVER_FORWARDED_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66.",   # SEG, Surface Segmentation, registration, fiducials
    "1.2.840.10008.5.1.4.1.1.88.",   # SR (incl. Comprehensive 3D SR)
    "1.2.840.10008.5.1.4.1.1.481.",  # RT
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL, OBJ, MTL
    "1.2.840.10008.5.1.4.1.1.11.",   # presentation states
)
NEVER_FORWARDED_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTIMAGE", "RTRECORD",
                              "RTION", "KO", "PR", "REG", "FID", "DOC", "M3D"}
MAX_DECISIONS = 5000  # forwarding decisions kept in memory for the status route


class SettingsError(ValueError):
    """A problem in the "Vesalius" configuration section; the message names the key."""


@dataclass(frozen=True)
class Filter:
    """Which stable series are forwarded automatically; every criterion must match (empty = any)."""

    modalities: tuple[str, ...] = ("CT",)
    body_parts: tuple[str, ...] = ()
    series_description: str = ""  # regular expression, searched case-insensitively
    min_instances: int = 1


@dataclass(frozen=True)
class Settings:
    modality: str  # the node's alias in Orthanc's DicomModalities
    node_http_url: str = ""  # the node's HTTP API, for the status route; "" = not queried
    node_http_token_file: str = ""  # file holding a bearer token of the node's API; read at each call
    node_dashboard_url: str = ""  # the node's dashboard as browsers reach it; "" = node_http_url
    auto_forward: bool = True
    filter: Filter = field(default_factory=Filter)
    timeout: float = 10.0  # s for calls to the node's HTTP API


FILTER_KEYS = {"Modalities", "BodyParts", "SeriesDescription", "MinInstances"}
SETTINGS_KEYS = {"Modality", "NodeHttpUrl", "NodeHttpTokenFile", "NodeDashboardUrl", "AutoForward", "Filter",
                 "Timeout"}


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(f"Vesalius.{key}: expected a list of strings, got {value!r}")
    return tuple(v.strip().upper() for v in value)


def parse_settings(configuration: dict[str, Any]) -> Settings:
    """The plugin's settings from the whole Orthanc configuration; raise SettingsError if invalid."""
    section = configuration.get("Vesalius")
    if not isinstance(section, dict):
        raise SettingsError('Vesalius: the configuration needs a "Vesalius" section with at least "Modality"')
    unknown = sorted(set(section) - SETTINGS_KEYS)
    if unknown:
        raise SettingsError(f"Vesalius.{unknown[0]}: unknown key "
                            f"(allowed: {', '.join(sorted(SETTINGS_KEYS))})")
    modality = section.get("Modality")
    if not isinstance(modality, str) or not modality:
        raise SettingsError("Vesalius.Modality: required, the DicomModalities alias of the Vesalius node")
    modalities = configuration.get("DicomModalities", {})
    in_database = configuration.get("DicomModalitiesInDatabase", False) is True  # then not known here
    if not in_database and isinstance(modalities, dict) and modality not in modalities:
        raise SettingsError(f"Vesalius.Modality: {modality!r} is not in DicomModalities "
                            f"({', '.join(sorted(modalities))})")
    url = section.get("NodeHttpUrl", "")
    if not isinstance(url, str) or (url and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url)):
        raise SettingsError(f"Vesalius.NodeHttpUrl: expected http(s)://host:port, got {url!r}")
    dashboard = section.get("NodeDashboardUrl", "")
    if not isinstance(dashboard, str) or (dashboard and not re.fullmatch(r"https?://[^/\s]+(/\S*)?",
                                                                          dashboard)):
        raise SettingsError(f"Vesalius.NodeDashboardUrl: expected http(s)://host:port, got {dashboard!r}")
    token_file = section.get("NodeHttpTokenFile", "")
    if not isinstance(token_file, str):
        raise SettingsError(f"Vesalius.NodeHttpTokenFile: expected a file path, got {token_file!r}")
    auto = section.get("AutoForward", True)
    if not isinstance(auto, bool):
        raise SettingsError(f"Vesalius.AutoForward: expected true or false, got {auto!r}")
    timeout = section.get("Timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise SettingsError(f"Vesalius.Timeout: expected a number of seconds > 0, got {timeout!r}")
    table = section.get("Filter", {})
    if not isinstance(table, dict):
        raise SettingsError(f"Vesalius.Filter: expected an object, got {table!r}")
    unknown = sorted(set(table) - FILTER_KEYS)
    if unknown:
        raise SettingsError(f"Vesalius.Filter.{unknown[0]}: unknown key "
                            f"(allowed: {', '.join(sorted(FILTER_KEYS))})")
    description = table.get("SeriesDescription", "")
    if not isinstance(description, str):
        raise SettingsError(f"Vesalius.Filter.SeriesDescription: expected a string, got {description!r}")
    try:
        re.compile(description)
    except re.error as err:
        raise SettingsError(f"Vesalius.Filter.SeriesDescription: not a valid regular expression: "
                            f"{err}") from err
    minimum = table.get("MinInstances", 1)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise SettingsError(f"Vesalius.Filter.MinInstances: expected an integer >= 0, got {minimum!r}")
    return Settings(
        modality=modality,
        node_http_url=url.rstrip("/"),
        node_http_token_file=token_file,
        node_dashboard_url=(dashboard or url).rstrip("/"),
        auto_forward=auto,
        filter=Filter(
            modalities=_strings("Filter.Modalities", table.get("Modalities", ["CT"])),
            body_parts=_strings("Filter.BodyParts", table.get("BodyParts", [])),
            series_description=description,
            min_instances=minimum,
        ),
        timeout=float(timeout),
    )


# --- what a series is ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesFacts:
    """What the decisions need to know of one series stored in Orthanc."""

    orthanc_id: str
    study_id: str
    series_instance_uid: str
    modality: str
    body_part: str
    series_description: str
    instances: int
    sop_class_uid: str
    manufacturer: str
    image_type: str


def _get_json(uri: str) -> Any:
    return json.loads(orthanc.RestApiGet(uri))


def series_facts(series_id: str) -> SeriesFacts:
    """Main tags of the series plus SOP class, manufacturer and image type of its first instance."""
    series = _get_json(f"/series/{series_id}")
    tags = series.get("MainDicomTags", {})
    instances = series.get("Instances", [])
    first: dict[str, Any] = _get_json(f"/instances/{instances[0]}/simplified-tags") if instances else {}
    return SeriesFacts(
        orthanc_id=series_id,
        study_id=str(series.get("ParentStudy", "")),
        series_instance_uid=str(tags.get("SeriesInstanceUID", "")),
        modality=str(tags.get("Modality", first.get("Modality", ""))).strip().upper(),
        body_part=str(tags.get("BodyPartExamined", first.get("BodyPartExamined", ""))).strip().upper(),
        series_description=str(tags.get("SeriesDescription", first.get("SeriesDescription", ""))),
        instances=len(instances),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        manufacturer=str(first.get("Manufacturer", "")),
        image_type=str(first.get("ImageType", "")),
    )


def never_forward_reason(facts: SeriesFacts) -> str | None:
    """Why this series must never go to the node (its outputs, non-images, derived), else None."""
    if facts.manufacturer.strip().lower() == VESALIUS_MANUFACTURER.lower():
        return "a Vesalius result (Manufacturer Vesalius)"
    if facts.sop_class_uid in (SEG, SURFACE_SEGMENTATION, COMPREHENSIVE_3D_SR) or \
            facts.sop_class_uid.startswith(NEVER_FORWARDED_SOP_PREFIXES):
        return f"SOP class {facts.sop_class_uid} is not an image to segment"
    if facts.modality in NEVER_FORWARDED_MODALITIES:
        return f"modality {facts.modality} is not an image to segment"
    if facts.image_type.replace("/", "\\").split("\\")[0].strip().upper() == "DERIVED":
        return f"derived image (ImageType {facts.image_type})"
    if facts.instances == 0:
        return "no instances"
    return None


def filter_reason(facts: SeriesFacts, rules: Filter) -> str | None:
    """Why this series does not match the auto-forward filter, else None."""
    if rules.modalities and facts.modality not in rules.modalities:
        return f"modality {facts.modality or '(none)'} not in {list(rules.modalities)}"
    if rules.body_parts and facts.body_part not in rules.body_parts:
        return f"body part {facts.body_part or '(none)'} not in {list(rules.body_parts)}"
    if rules.series_description and not re.search(rules.series_description, facts.series_description,
                                                  re.IGNORECASE):
        return f"series description {facts.series_description!r} does not match {rules.series_description!r}"
    if facts.instances < rules.min_instances:
        return f"{facts.instances} instances, fewer than {rules.min_instances}"
    return None


# --- decisions and sending -------------------------------------------------------------------------


class Decisions:
    """The latest forwarding decision per series (bounded, in memory), for the status route."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_series: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def record(self, facts: SeriesFacts, decision: str, reason: str, via: str, job: str = "") -> None:
        entry = {"series": facts.orthanc_id, "study": facts.study_id,
                 "series_instance_uid": facts.series_instance_uid, "decision": decision,
                 "reason": reason, "via": via, "job": job, "at": time.time()}
        with self._lock:
            self._by_series.pop(facts.orthanc_id, None)
            self._by_series[facts.orthanc_id] = entry
            while len(self._by_series) > MAX_DECISIONS:
                self._by_series.popitem(last=False)

    def for_study(self, study_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._by_series.values() if e["study"] == study_id]


DECISIONS = Decisions()


def send_to_node(settings: Settings, series_ids: list[str]) -> str:
    """Queue an Orthanc C-STORE job of these series to the node's modality; returns the job id."""
    body = json.dumps({"Resources": series_ids, "Synchronous": False})
    answer = json.loads(orthanc.RestApiPost(f"/modalities/{settings.modality}/store", body))
    return str(answer.get("ID", ""))


def on_stable_series(settings: Settings, series_id: str) -> None:
    facts = series_facts(series_id)
    reason = never_forward_reason(facts)
    if reason is None and not settings.auto_forward:
        reason = "AutoForward is off"
    if reason is None:
        reason = filter_reason(facts, settings.filter)
    if reason is not None:
        DECISIONS.record(facts, "skipped", reason, "auto")
        orthanc.LogInfo(f"Vesalius: not forwarding series {series_id}: {reason}")
        return
    job = send_to_node(settings, [series_id])
    DECISIONS.record(facts, "sent", "matches the filter", "auto", job)
    orthanc.LogWarning(f"Vesalius: forwarding series {series_id} "
                       f"({facts.modality}, {facts.instances} instances) to {settings.modality}, job {job}")


# --- REST --------------------------------------------------------------------------------------------


def _answer(output: orthanc.RestOutput, status: int, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=1)  # ASCII only, so len(text) is its size in bytes
    if status == 200:
        output.AnswerBuffer(text, "application/json")
        return
    try:
        output.SendHttpStatus(status, text.encode())
    except TypeError:  # orthanc-python 4.0 wants (status, body, size)
        output.SendHttpStatus(status, text, len(text))


def _level(resource_id: str) -> tuple[str, dict[str, Any]] | None:
    """("studies" or "series", its JSON) for an Orthanc study or series id, else None."""
    for level in ("studies", "series"):
        try:
            return level, _get_json(f"/{level}/{resource_id}")
        except orthanc.OrthancException:
            continue
    return None


def send_resource(settings: Settings, resource_id: str) -> tuple[int, dict[str, Any]]:
    """The button: send a study (each of its forwardable series) or one series, ignoring the filter."""
    found = _level(resource_id)
    if found is None:
        return 404, {"error": f"no study or series {resource_id} in this Orthanc"}
    level, resource = found
    series_ids = resource.get("Series", []) if level == "studies" else [resource_id]
    sent: list[SeriesFacts] = []
    skipped: dict[str, str] = {}
    for series_id in series_ids:
        facts = series_facts(series_id)
        reason = never_forward_reason(facts)
        if reason is None:
            sent.append(facts)
        else:
            skipped[series_id] = reason
            DECISIONS.record(facts, "skipped", reason, "button")
    if not sent:
        return 409, {"error": "nothing to send: no series here is an image series Vesalius can process",
                     "skipped": skipped}
    try:
        job = send_to_node(settings, [f.orthanc_id for f in sent])
    except orthanc.OrthancException as err:
        return 502, {"error": f"could not start sending to modality {settings.modality!r}: {err}"}
    for facts in sent:
        DECISIONS.record(facts, "sent", "Send to Vesalius", "button", job)
    orthanc.LogWarning(f"Vesalius: sending {len(sent)} series of {level} {resource_id} "
                       f"to {settings.modality} (button), job {job}")
    return 200, {"sent": [f.orthanc_id for f in sent], "skipped": skipped, "job": job,
                 "modality": settings.modality}


def _node_get(settings: Settings, path: str, study_uid: str) -> Any:
    query = urllib.parse.urlencode({"study": study_uid})
    request = urllib.request.Request(f"{settings.node_http_url}{path}?{query}")
    if settings.node_http_token_file:  # read each time, so a rotated token needs no Orthanc restart
        with open(settings.node_http_token_file, encoding="ascii") as f:
            request.add_header("Authorization", f"Bearer {f.read().strip()}")
    with urllib.request.urlopen(request, timeout=settings.timeout) as r:
        return json.loads(r.read())


def study_status(settings: Settings, resource_id: str) -> tuple[int, dict[str, Any]]:
    """What the plugin decided and what the node received, ran and delivered, for one study."""
    found = _level(resource_id)
    if found is None:
        return 404, {"error": f"no study or series {resource_id} in this Orthanc"}
    level, resource = found
    if level == "series":
        resource_id = str(resource.get("ParentStudy", ""))
        resource = _get_json(f"/studies/{resource_id}")
    study_uid = str(resource.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
    status: dict[str, Any] = {"study": resource_id, "study_instance_uid": study_uid,
                              "modality": settings.modality, "forwarding": DECISIONS.for_study(resource_id)}
    if not settings.node_http_url:
        status["node"] = {"reachable": False, "error": "Vesalius.NodeHttpUrl is not configured"}
        return 200, status
    try:
        status["node"] = {"reachable": True, "url": settings.node_http_url,
                          **{what: _node_get(settings, f"/{what}", study_uid)
                             for what in ("series", "jobs", "deliveries")}}
    except (OSError, ValueError) as err:
        status["node"] = {"reachable": False, "url": settings.node_http_url, "error": str(err)}
        return 200, status
    for job in status["node"]["jobs"]:  # what the study page shows: the state in words, a link
        job["words"] = job_words(job)
        job["page"] = f"{settings.node_dashboard_url}/#/job/{int(job['id'])}"
    return 200, status


def job_words(job: dict[str, Any]) -> str:
    """A node job's state as the node's dashboard says it."""
    progress = job.get("progress") or {}
    if job.get("state") == "running" and progress:
        return f"running: stage {progress.get('n')} of {progress.get('of')} ({progress.get('stage')})"
    if job.get("state") == "failed":
        return f"failed: {job.get('error') or 'no reason recorded'}"
    return str(job.get("state"))


# --- Orthanc Explorer --------------------------------------------------------------------------------

EXPLORER_JS = r"""
// Vesalius: "Send to Vesalius" and "Vesalius status" on the study and series pages.
(function () {
  function vesaliusButtons(page) {
    $('#' + page).live('pagebeforecreate', function () {
      var anchor = $('#' + page + '-delete').parent().parent();
      var send = $('<a>').attr('id', 'vesalius-send-' + page).attr('data-role', 'button')
        .attr('href', '#').attr('data-icon', 'forward').attr('data-theme', 'e').text('Send to Vesalius');
      var status = $('<a>').attr('id', 'vesalius-status-' + page).attr('data-role', 'button')
        .attr('href', '#').attr('data-icon', 'info').attr('data-theme', 'e').text('Vesalius status');
      send.insertBefore(anchor);
      status.insertBefore(anchor);
      send.click(function () {
        if (!$.mobile.pageData) { return; }
        $.ajax({
          url: '../vesalius/send/' + $.mobile.pageData.uuid, type: 'POST', dataType: 'json',
          success: function (r) {
            alert('Sent ' + r.sent.length + ' series to Vesalius. Results appear in this study ' +
                  'as new series (SEG, Surface Segmentation, SR) when processing is done.');
          },
          error: function (xhr) {
            var text = xhr.responseText;
            try { text = JSON.parse(text).error; } catch (e) { }
            alert('Vesalius: ' + (text || xhr.statusText));
          }
        });
      });
      status.click(function () {
        if ($.mobile.pageData) { window.open('../vesalius/status/' + $.mobile.pageData.uuid); }
      });
    });
  }
  vesaliusButtons('study');
  vesaliusButtons('series');

  // The study page: the node's jobs for this study, each linked to its page on the dashboard.
  $('#study').live('pagebeforeshow', function () {
    if (!$.mobile.pageData) { return; }
    var box = $('#vesalius-study-status');
    if (box.length === 0) {
      box = $('<div>').attr('id', 'vesalius-study-status').addClass('ui-body ui-body-e');
      $('#study [data-role="content"]').first().prepend(box);
    }
    box.empty().append($('<b>').text('Vesalius: '), $('<span>').text('asking the node…'));
    $.ajax({
      url: '../vesalius/status/' + $.mobile.pageData.uuid, dataType: 'json',
      success: function (s) {
        box.empty().append($('<b>').text('Vesalius: '));
        if (!s.node.reachable) {
          box.append($('<span>').text('node not reachable (' + s.node.error + ')'));
          return;
        }
        if (s.node.jobs.length === 0) { box.append($('<span>').text('no job for this study')); return; }
        $.each(s.node.jobs, function (i, job) {
          box.append($('<div>').addClass('vesalius-job').append(
            $('<a>').attr('href', job.page).attr('target', '_blank').attr('rel', 'noopener')
              .text('job #' + job.id), $('<span>').text(' ' + job.model + ': ' + job.words)));
        });
      },
      error: function (xhr) { box.empty().text('Vesalius: status unavailable (' + xhr.status + ')'); }
    });
  });
})();
"""


# --- registration ----------------------------------------------------------------------------------


def register(settings: Settings) -> None:
    def on_change(change_type: int, level: int, resource_id: str) -> None:
        if change_type != orthanc.ChangeType.STABLE_SERIES:
            return
        try:
            on_stable_series(settings, resource_id)
        except Exception as err:  # never let one series break Orthanc's change loop
            orthanc.LogError(f"Vesalius: auto-forward of series {resource_id} failed: "
                             f"{type(err).__name__}: {err}")

    def rest(handler: Any, method: str) -> orthanc.RestCallback:
        def callback(output: orthanc.RestOutput, uri: str, /, **request: Any) -> None:
            if request.get("method") != method:
                output.SendMethodNotAllowed(method)
                return
            try:
                status, document = handler(settings, request["groups"][0])
            except Exception as err:
                orthanc.LogError(f"Vesalius: {uri} failed: {type(err).__name__}: {err}")
                status, document = 500, {"error": f"{type(err).__name__}: {err}"}
            _answer(output, status, document)
        return callback

    orthanc.RegisterOnChangeCallback(on_change)
    orthanc.RegisterRestCallback("/vesalius/send/([0-9a-f-]+)", rest(send_resource, "POST"))
    orthanc.RegisterRestCallback("/vesalius/status/([0-9a-f-]+)", rest(study_status, "GET"))
    orthanc.ExtendOrthancExplorer(EXPLORER_JS)
    orthanc.LogWarning(f"Vesalius plugin: modality {settings.modality!r}, auto-forward "
                       f"{'on' if settings.auto_forward else 'off'}, filter {settings.filter}")


SETTINGS = parse_settings(json.loads(orthanc.GetConfiguration()))  # a bad section stops Orthanc, loudly
register(SETTINGS)
