"""Label name -> coded meaning (SNOMED CT) and colour: the one table every output object uses.

Codes follow the current DICOM PS3.16 context groups (CID 7150 Segmentation Property Categories,
CID 7151 Segmentation Property Types, CID 244 Laterality) with scheme "SCT"; the retired SNOMED-RT
("SRT") codes are never used. Note that CID 7150 codes "Anatomical Structure" as SCT 91723000 (the
SNOMED CT id of SNOMED-RT T-D000A); some tools write 123037004, which is SNOMED's "Body structure"
hierarchy root, not a member of CID 7150. Colours follow 3D Slicer's generic anatomy colours so a
structure looks the same as in the viewers radiologists already use. A new label is one new row.
TotalSegmentator's classes live in their own table (``codes_totalseg``); ``term_for`` reads both.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.sr.coding import Code

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")  # CID 7150
TISSUE = Code("85756007", "SCT", "Tissue")  # CID 7150
MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")  # CID 7150

LEFT = Code("7771000", "SCT", "Left")  # CID 244
RIGHT = Code("24028007", "SCT", "Right")  # CID 244


@dataclass(frozen=True)
class Term:
    """How one label is described in DICOM: category, type, optional laterality, colour."""

    name: str
    label: str
    category: Code
    type: Code
    modifier: Code | None
    rgb: tuple[int, int, int]
    opacity: float = 1.0  # Recommended Presentation Opacity of its surface; enclosing ones see-through
    # Anatomic Region (and its laterality) for findings that are not anatomy themselves, e.g. a
    # cyst (type) of the left (region modifier) kidney (region).
    region: Code | None = None
    region_modifier: Code | None = None

    @property
    def cielab(self) -> tuple[int, int, int]:
        """Recommended Display CIELab Value, scaled to 0..65535 as DICOM stores it."""
        value = hd.color.CIELabColor.from_rgb(*self.rgb).value
        return (int(value[0]), int(value[1]), int(value[2]))

    @property
    def grayscale(self) -> int:
        """Recommended Display Grayscale Value (0..65535): the colour's lightness."""
        return self.cielab[0]


_TERMS: tuple[Term, ...] = (
    Term("body", "Body", ANATOMICAL_STRUCTURE,
         Code("38266002", "SCT", "Entire body"), None, (177, 122, 101), opacity=0.3),
    Term("lung_left", "Left lung", ANATOMICAL_STRUCTURE,
         Code("39607008", "SCT", "Lung"), LEFT, (197, 165, 145)),
    Term("lung_right", "Right lung", ANATOMICAL_STRUCTURE,
         Code("39607008", "SCT", "Lung"), RIGHT, (172, 138, 115)),
    Term("airways", "Airways", ANATOMICAL_STRUCTURE,
         Code("89187006", "SCT", "Airway structure"), None, (182, 228, 255)),
    Term("bone", "Bone", TISSUE,
         Code("3138006", "SCT", "Bone"), None, (241, 214, 145)),
    Term("liver", "Liver", ANATOMICAL_STRUCTURE,
         Code("10200004", "SCT", "Liver"), None, (221, 130, 101)),
    Term("heart", "Heart", ANATOMICAL_STRUCTURE,
         Code("80891009", "SCT", "Heart"), None, (206, 110, 84)),
)

TERMS: dict[str, Term] = {term.name: term for term in _TERMS}


def all_terms() -> dict[str, Term]:
    """Every known label: this table and TotalSegmentator's (``codes_totalseg``), ours first."""
    from vesalius.dicom_out.codes_totalseg import TOTALSEG_TERMS  # imports this module: import lazily

    return {**TOTALSEG_TERMS, **TERMS}


def term_for(name: str) -> Term:
    """The coded description of a label; KeyError naming the label."""
    terms = all_terms()
    try:
        return terms[name]
    except KeyError:
        raise KeyError(f"no DICOM code for label {name!r} ({len(terms)} labels are known; "
                       f"add a row to dicom_out/codes.py)") from None
