"""Coded terminology: label name -> DICOM code, colour and opacity (``Term``).

Vocabulary both sides share: ``inference`` names the structures its models produce with these
names (and refuses a label without a code at load time); ``dicom_out`` writes their codes and
colours into every output object. Our own table is ``anatomy``; TotalSegmentator's classes are
``totalseg``.
"""

from __future__ import annotations

from vesalius.inference.terminology.anatomy import TERMS
from vesalius.inference.terminology.term import Term
from vesalius.inference.terminology.totalseg import TOTAL_CLASSES, TOTALSEG_TERMS

__all__ = ["TERMS", "TOTALSEG_TERMS", "TOTAL_CLASSES", "Term", "all_terms", "has_code", "term_for"]

_ALL: dict[str, Term] = {**TOTALSEG_TERMS, **TERMS}


def all_terms() -> dict[str, Term]:
    """Every known label: our table and TotalSegmentator's, ours winning where both name one."""
    return dict(_ALL)


def term_for(name: str) -> Term:
    """The coded description of a label; KeyError naming the label."""
    try:
        return _ALL[name]
    except KeyError:
        raise KeyError(f"no DICOM code for label {name!r} ({len(_ALL)} labels are known; "
                       f"add a row to inference/terminology/anatomy.py)") from None


def has_code(name: str) -> bool:
    """True when ``name`` resolves to a coded term."""
    return name in _ALL
