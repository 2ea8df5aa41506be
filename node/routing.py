"""Routing rules: which completed series become jobs, with which model, to which destinations;
and, for study-level rules, which series of a complete study to process, with the reasons why."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from vesalius.dicom_out.identity import MANUFACTURER
from vesalius.node.config import Config, Rule

# Image SOP classes a model can read as a volume; everything else (SEG, SR, Surface, RT, STL, our
# own outputs...) is stored but never processed, so no loop can form between the node and a PACS.
PROCESSABLE_SOP_CLASSES = frozenset(
    {CTImageStorage, MRImageStorage, EnhancedCTImageStorage, EnhancedMRImageStorage,
     LegacyConvertedEnhancedCTImageStorage, LegacyConvertedEnhancedMRImageStorage}
)


# How a study rule's reason for a matching series it did not choose goes on (node.store's series
# listing tells "not chosen" from "no rule matches" by it).
RANKED_LOWER = "the chosen series ranks higher on"


@dataclass(frozen=True)
class Route:
    rule: str
    model: str
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at in a completed series: its series row plus what its headers say
    (node.series reads them once per series, most common value across its instances)."""

    series_instance_uid: str
    modality: str = ""
    sop_class_uid: str = ""
    series_description: str = ""
    body_part: str = ""
    manufacturer: str = ""
    calling_ae: str = ""
    image_type: tuple[str, ...] = ()
    orientation: str = ""  # axial | coronal | sagittal | oblique | "" (no ImageOrientationPatient)
    slice_thickness: float = 0.0  # mm; 0: not known
    pixel_spacing: float = 0.0  # mm, the coarser of row and column; 0: not known
    slices: int = 0  # distinct slice positions in the main orientation
    coverage_mm: float = 0.0  # extent of those positions along the slice normal
    kernel: str = ""  # ConvolutionKernel, values joined by "\\"
    contrast: bool = False  # ContrastBolusAgent given
    completed_at: float = 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SeriesFacts:
        """From a series row and/or stored facts (unknown keys ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        kept = {k: v for k, v in values.items() if k in known and v is not None}
        if "image_type" in kept:
            kept["image_type"] = tuple(kept["image_type"])
        return cls(**kept)

    def describe(self) -> str:
        """'1.0 mm axial, 412 slices, kernel B30f': what an operator needs to recognise it."""
        parts = [f"{self.slice_thickness:g} mm {self.orientation or 'unknown orientation'}"
                 if self.slice_thickness else self.orientation or "unknown orientation",
                 f"{self.slices} slices"]
        if self.coverage_mm:
            parts.append(f"{self.coverage_mm:.0f} mm")
        if self.kernel:
            parts.append(f"kernel {self.kernel}")
        if self.contrast:
            parts.append("contrast")
        return ", ".join(parts)


def _own_or_not_an_image(series: SeriesFacts) -> str:
    if series.sop_class_uid not in PROCESSABLE_SOP_CLASSES:
        return f"not an image series a model reads (SOP class {series.sop_class_uid})"
    if series.manufacturer == MANUFACTURER:
        return "our own output"
    return ""


def why_not(rule: Rule, series: SeriesFacts) -> str:
    """Why the rule does not take the series ("" when every criterion it names holds)."""

    def among(value: str, allowed: tuple[str, ...]) -> bool:
        return not allowed or value.strip().upper() in {a.upper() for a in allowed}

    image_type = {v.upper() for v in series.image_type}
    excluded = image_type & {v.upper() for v in rule.exclude_image_type}
    missing = {v.upper() for v in rule.image_type} - image_type
    checks = (
        (among(series.modality, rule.modality), f"modality {series.modality or '(none)'}"),
        (not rule.sop_class or series.sop_class_uid in rule.sop_class, f"SOP class {series.sop_class_uid}"),
        (among(series.body_part, rule.body_part), f"body part {series.body_part or '(none)'}"),
        (among(series.calling_ae, rule.calling_ae), f"sent by {series.calling_ae}"),
        (not rule.series_description
         or re.search(rule.series_description, series.series_description, re.I) is not None,
         "series description does not match"),
        (not excluded, f"ImageType {chr(92).join(series.image_type)}"),
        (not missing, f"ImageType {chr(92).join(series.image_type) or '(none)'} lacks "
                      f"{', '.join(sorted(missing))}"),
        (among(series.orientation, rule.orientation), f"{series.orientation or 'unknown'} orientation"),
        (series.slice_thickness >= rule.min_slice_thickness,
         f"{series.slice_thickness:g} mm slices < min_slice_thickness {rule.min_slice_thickness:g}"),
        (not rule.max_slice_thickness or 0 < series.slice_thickness <= rule.max_slice_thickness,
         f"{series.slice_thickness:g} mm slices > max_slice_thickness {rule.max_slice_thickness:g}"),
        (not rule.max_pixel_spacing or 0 < series.pixel_spacing <= rule.max_pixel_spacing,
         f"{series.pixel_spacing:g} mm pixels > max_pixel_spacing {rule.max_pixel_spacing:g}"),
        (series.slices >= rule.min_slices, f"{series.slices} slices < min_slices {rule.min_slices}"),
        (series.coverage_mm >= rule.min_coverage_mm,
         f"{series.coverage_mm:.0f} mm covered < min_coverage_mm {rule.min_coverage_mm:g}"),
        (not rule.kernel or re.search(rule.kernel, series.kernel, re.I) is not None,
         f"kernel {series.kernel or '(none)'} does not match"),
        (not rule.exclude_kernel or re.search(rule.exclude_kernel, series.kernel, re.I) is None,
         f"kernel {series.kernel} excluded"),
        (rule.contrast == "any" or series.contrast == (rule.contrast == "with"),
         "with contrast" if series.contrast else "without contrast"),
    )
    return _own_or_not_an_image(series) or next((why for ok, why in checks if not ok), "")


def may_take(config: Config, modality: str, sop_class_uid: str, manufacturer: str = "") -> bool:
    """Whether some rule could take a series of this modality and SOP class, from what its first
    instance says (the rest of every rule is judged once the series is complete)."""
    if sop_class_uid not in PROCESSABLE_SOP_CLASSES or manufacturer == MANUFACTURER:
        return False
    wanted = modality.strip().upper()
    return any(not rule.modality or wanted in {m.upper() for m in rule.modality} for rule in config.rules)


def rule_matches(rule: Rule, series: SeriesFacts | Mapping[str, Any]) -> bool:
    """Every criterion the rule names holds for the series (case-insensitive)."""
    facts = series if isinstance(series, SeriesFacts) else SeriesFacts.from_mapping(series)
    return not why_not(rule, facts)


def routes_for(config: Config, series: SeriesFacts | Mapping[str, Any],
               trigger: str = "series") -> list[Route]:
    """The jobs a completed series becomes under the rules of ``trigger`` (none for non-images
    and our own outputs)."""
    facts = series if isinstance(series, SeriesFacts) else SeriesFacts.from_mapping(series)
    return [Route(rule.name, rule.model, config.destination_names(rule))
            for rule in config.rules if rule.trigger == trigger and rule_matches(rule, facts)]


def _preference_key(rule: Rule, series: SeriesFacts) -> tuple[float, ...]:
    """Lower is better, one number per name in ``rule.prefer``, then more slices, then older UID."""
    first_kernel = series.kernel.split("\\")[0]
    thickness = series.slice_thickness or math.inf
    values = {
        "axial": series.orientation != "axial", "coronal": series.orientation != "coronal",
        "sagittal": series.orientation != "sagittal",
        "original": "ORIGINAL" not in {v.upper() for v in series.image_type},
        "soft_kernel": re.search(rule.soft_kernel, first_kernel, re.I) is None,
        "thinnest": thickness, "thickest": -series.slice_thickness,
        "most_slices": -series.slices, "largest_coverage": -series.coverage_mm,
        "with_contrast": not series.contrast, "without_contrast": series.contrast,
        "newest": -series.completed_at,
    }
    return tuple(float(values[name]) for name in rule.prefer) + (-float(series.slices),)


@dataclass(frozen=True)
class Decision:
    series_instance_uid: str
    chosen: bool
    reason: str  # "chosen: 1 mm axial, 412 slices, kernel B30f" or "skipped: ..."

    def row(self) -> tuple[str, str, str]:
        return (self.series_instance_uid, "chosen" if self.chosen else "skipped", self.reason)


@dataclass(frozen=True)
class Selection:
    rule: Rule
    decisions: tuple[Decision, ...] = field(default=())

    @property
    def chosen(self) -> tuple[str, ...]:
        return tuple(d.series_instance_uid for d in self.decisions if d.chosen)


def select_series(rule: Rule, study: Sequence[SeriesFacts]) -> Selection:
    """Which series of a complete study the study-level ``rule`` processes, each with its reason:
    every matching one (``select = "all"``) or the first by the rule's preferences (``"best"``)."""
    decisions: dict[str, Decision] = {}
    candidates = []
    for series in sorted(study, key=lambda s: s.series_instance_uid):
        why = why_not(rule, series)
        if why:
            decisions[series.series_instance_uid] = Decision(series.series_instance_uid, False,
                                                             f"skipped: {why}")
        else:
            candidates.append(series)
    if rule.select == "all":
        chosen = candidates
    else:
        ranked = sorted(candidates, key=lambda s: (_preference_key(rule, s), s.series_instance_uid))
        chosen = ranked[:1]
        for other in ranked[1:]:
            best, mine = _preference_key(rule, ranked[0]), _preference_key(rule, other)
            names = (*rule.prefer, "most_slices")
            on = next((names[i] for i in range(len(best)) if best[i] != mine[i]), "series UID order")
            decisions[other.series_instance_uid] = Decision(
                other.series_instance_uid, False,
                f"skipped: {other.describe()}; {RANKED_LOWER} {on}")
    for series in chosen:
        decisions[series.series_instance_uid] = Decision(series.series_instance_uid, True,
                                                         f"chosen: {series.describe()}")
    return Selection(rule, tuple(decisions[s.series_instance_uid]
                                 for s in sorted(study, key=lambda s: s.series_instance_uid)))
