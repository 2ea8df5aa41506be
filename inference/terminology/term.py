"""What a coded label is (``Term``) and the shared codes its tables use.

Codes follow the current DICOM PS3.16 context groups (CID 7150 Segmentation Property Categories,
CID 7151 Segmentation Property Types, CID 244 Laterality) with scheme "SCT"; the retired SNOMED-RT
("SRT") codes are never used. Note that CID 7150 codes "Anatomical Structure" as SCT 91723000 (the
SNOMED CT id of SNOMED-RT T-D000A); some tools write 123037004, which is SNOMED's "Body structure"
hierarchy root, not a member of CID 7150.
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
