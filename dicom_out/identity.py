"""Who wrote an output object, and the deterministic UIDs that make re-runs replace, not duplicate.

Every object the node writes names us (manufacturer, model, software version) and the algorithm that
produced its content; its UIDs are a pure function of the source series, the algorithm and the
object's role, so processing the same series with the same model again yields the same Series and
SOP Instance UIDs and the PACS overwrites the earlier result instead of piling up copies.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import uuid
from dataclasses import dataclass, field

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

MANUFACTURER = "Vesalius"
MODEL_NAME = "Vesalius node"
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162
MORPHOLOGICAL_OPERATIONS = Code("123104", "DCM", "Morphological Operations")  # CID 7162

DEVICE_SERIAL_NUMBER = "0"  # software device: no hardware serial; Type 1 in Enhanced General Equipment
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:vesalius:dicom-output")
# Device Observer UID of the SR observation context: the same for every report we write.
DEVICE_UID = f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'device/' + MODEL_NAME).int}"

try:
    SOFTWARE_VERSION = importlib.metadata.version("vesalius")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    SOFTWARE_VERSION = "0+unknown"


@dataclass(frozen=True)
class Algorithm:
    """The model whose output an object carries (Algorithm Identification: name and version).

    ``family`` is the CID 7162 Algorithm Family; it describes the algorithm and takes no part in
    the derived UIDs (a model is identified by its name and version).
    """

    name: str
    version: str
    family: Code = field(default=ARTIFICIAL_INTELLIGENCE, compare=False)
    # What a re-run replaces: "" derives UIDs from the source series; a study-level rule's result
    # key ("study/<uid>/<rule>") derives them from it, so a newer chosen series replaces the results.
    result_key: str = ""


def derived_uid(source_series_uid: str, algorithm: Algorithm, role: str) -> str:
    """A 2.25 UID derived from (source series or the algorithm's result key, algorithm name and
    version, role).

    ``role`` names the UID's purpose, e.g. ``"seg/series"`` or ``"seg/instance"``, so one run's
    objects never share UIDs; the same inputs always give the same UID. The UID is the integer
    form of a name-based (SHA-1, version 5) UUID, as PS3.5 B.2 allows under the 2.25 root.
    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns a
    random UUID, so it cannot be used for this.)
    """
    if not source_series_uid or not role:
        raise ValueError("derived_uid needs a source series UID and a role")
    source = algorithm.result_key or source_series_uid
    name = "\x1f".join(("vesalius", source, algorithm.name, algorithm.version, role))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


# Series numbers of our output series: one fixed number per object kind (the same on every re-run,
# so a re-run replaces rather than adds), 9001-9009 for the objects derived from the BINARY SEG
# and 9011-9019 for the Label Map SEG and the surfaces that reference it.
SERIES_NUMBER = {"seg": 9001, "surface": 9002, "sr": 9003, "stl": 9004, "preview": 9005,
                 "labelmap-seg": 9011, "labelmap-surface": 9012}
# What each kind is, for the series list a radiologist reads: "Vesalius builtin_ct 0.1 - Segmentation".
SERIES_KIND = {"seg": "Segmentation", "surface": "3D surfaces", "sr": "Measurements",
               "stl": "3D printing models", "preview": "3D preview", "labelmap-seg": "Label map segmentation",
               "labelmap-surface": "3D surfaces (label map)"}


def series_description(algorithm: Algorithm, kind: str) -> str:
    """The Series Description of one kind of output: who made it, which model, what it is.

    ASCII only (" - ", not a dash), so it needs no Specific Character Set of its own.
    """
    return f"Vesalius {algorithm.name} {algorithm.version} - {SERIES_KIND[kind]}"[:64]


def name_series(ds: Dataset, algorithm: Algorithm, kind: str) -> None:
    """Set Series Number, Description, Date and Time of an output object of ``kind``.

    Series Date/Time are the object's Content Date/Time (when it was made), so a viewer or
    Orthanc Explorer files our series under the day they were written, not under "?".
    """
    ds.SeriesNumber = SERIES_NUMBER[kind]
    ds.SeriesDescription = series_description(algorithm, kind)
    now = datetime.datetime.now()
    ds.SeriesDate = ds.get("ContentDate") or now.strftime("%Y%m%d")
    ds.SeriesTime = ds.get("ContentTime") or now.strftime("%H%M%S")


def algorithm_identification(algorithm: Algorithm) -> hd.AlgorithmIdentificationSequence:
    """The Algorithm Identification Sequence (name, CID 7162 family, version, source = us)."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=algorithm.family,
        version=algorithm.version,
        source=MANUFACTURER,
    )
