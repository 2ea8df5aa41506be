"""Routing rules: which completed series become jobs, with which model, to which destinations."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Route:
    rule: str
    model: str
    destinations: tuple[str, ...]


def rule_matches(rule: Rule, series: Mapping[str, str]) -> bool:
    """Every criterion the rule names must hold for the series (case-insensitive)."""

    def among(value: str, allowed: tuple[str, ...]) -> bool:
        return not allowed or value.strip().upper() in {a.upper() for a in allowed}

    return (
        among(series["modality"], rule.modality)
        and (not rule.sop_class or series["sop_class_uid"] in rule.sop_class)
        and among(series["body_part"], rule.body_part)
        and among(series["calling_ae"], rule.calling_ae)
        and (not rule.series_description
             or re.search(rule.series_description, series["series_description"], re.I) is not None)
    )


def routes_for(config: Config, series: Mapping[str, str]) -> list[Route]:
    """The jobs a completed series should become (none for non-images and our own outputs)."""
    if series["sop_class_uid"] not in PROCESSABLE_SOP_CLASSES or series["manufacturer"] == MANUFACTURER:
        return []
    return [Route(rule.name, rule.model, config.destination_names(rule))
            for rule in config.rules if rule_matches(rule, series)]
