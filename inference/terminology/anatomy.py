"""Our own label table: label name -> coded meaning (SNOMED CT) and colour.

Colours follow 3D Slicer's generic anatomy colours so a structure looks the same as in the viewers
radiologists already use. A new label is one new row. TotalSegmentator's classes live in their own
table (``totalseg``); ``terminology.term_for`` reads both.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

from vesalius.inference.terminology.term import ANATOMICAL_STRUCTURE, LEFT, RIGHT, TISSUE, Term

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
