"""The label -> code table: current SNOMED CT codes from the DICOM context groups, usable colours."""

from __future__ import annotations

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from dicom_out.codes import TERMS, term_for
from inference.models import get_model

BUILTIN_LABELS = ("body", "lung_left", "lung_right", "airways", "bone")


def _in_context_group(cid: int, code) -> bool:
    """Whether ``code`` (value and meaning) is a member of a DICOM context group (PS3.16)."""
    group = getattr(codes, f"cid{cid}")
    return any(
        member.value == code.value and member.scheme_designator == code.scheme_designator
        and member.meaning == code.meaning
        for member in (getattr(group, name) for name in group.dir())
    )


@pytest.mark.parametrize("name", BUILTIN_LABELS)
def test_every_builtin_label_has_a_term(name: str) -> None:
    assert term_for(name).name == name


def test_the_builtin_model_labels_are_all_in_the_table() -> None:
    model = get_model("builtin_ct")
    assert {label.name for label in model.labels} <= set(TERMS)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_codes_are_current_sct_members_of_the_segmentation_context_groups(name: str) -> None:
    term = term_for(name)
    for code in (term.category, term.type, term.modifier):
        if code is not None:
            assert code.scheme_designator == "SCT"  # never retired SNOMED-RT ("SRT")
            assert code.value.isdigit()
    assert _in_context_group(7150, term.category)  # Segmentation Property Categories
    assert _in_context_group(7151, term.type)  # Segmentation Property Types
    if term.modifier is not None:
        assert _in_context_group(244, term.modifier)  # Laterality


def test_the_chosen_codes() -> None:
    lung_left, lung_right = term_for("lung_left"), term_for("lung_right")
    assert lung_left.category.value == "91723000"  # Anatomical Structure, CID 7150
    assert lung_left.type.value == lung_right.type.value == "39607008"  # Lung
    assert lung_left.modifier.value == "7771000"  # Left
    assert lung_right.modifier.value == "24028007"  # Right
    assert term_for("body").type.value == "38266002"  # Entire body
    assert term_for("body").modifier is None
    assert term_for("airways").type.value == "89187006"  # Airway structure
    bone = term_for("bone")
    assert (bone.category.value, bone.type.value) == ("85756007", "3138006")  # Tissue / Bone


def test_unknown_label_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="spleen"):
        term_for("spleen")


def test_colours_are_distinct_and_cielab_is_their_dicom_encoding() -> None:
    rgbs = [term.rgb for term in TERMS.values()]
    assert len(set(rgbs)) == len(rgbs)
    for term in TERMS.values():
        lab = term.cielab
        assert all(isinstance(v, int) and 0 <= v <= 65535 for v in lab)
        assert hd.color.CIELabColor.from_dicom_value(lab).to_rgb() == term.rgb
        assert term.grayscale == lab[0]
        assert 0.0 < term.opacity <= 1.0
