"""The label -> code table: current SNOMED CT codes from the DICOM context groups, usable colours."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from vesalius.inference.models.registry import resolve
from vesalius.inference.terminology import TERMS, TOTAL_CLASSES, TOTALSEG_TERMS, all_terms, term_for

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
    model = resolve("builtin_ct")
    assert {label.name for label in model.structures} <= set(TERMS)


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


def test_paired_structures_share_a_type_and_differ_only_in_laterality() -> None:
    """A viewer groups left and right by their type; the side is a CID 244 modifier (of the
    structure, or of the anatomic region for findings such as a kidney cyst)."""
    terms = all_terms()
    pairs = [(name, name.replace("_left", "_right")) for name in terms
             if "_left" in name and name.replace("_left", "_right") in terms]
    assert len(pairs) > 30
    for left_name, right_name in pairs:
        left, right = terms[left_name], terms[right_name]
        assert (left.category, left.type, left.region) == (right.category, right.type, right.region)
        sides = [(t.modifier or t.region_modifier) for t in (left, right)]
        assert [s.meaning if s else None for s in sides] == ["Left", "Right"], left_name
        assert all(_in_context_group(244, s) for s in sides if s is not None)


def test_unknown_label_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="unicorn_gland"):
        term_for("unicorn_gland")


def test_colours_are_distinct_and_cielab_is_their_dicom_encoding() -> None:
    rgbs = [term.rgb for term in TERMS.values()]
    assert len(set(rgbs)) == len(rgbs)
    for term in TERMS.values():
        lab = term.cielab
        assert all(isinstance(v, int) and 0 <= v <= 65535 for v in lab)
        assert hd.color.CIELabColor.from_dicom_value(lab).to_rgb() == term.rgb
        assert term.grayscale == lab[0]
        assert 0.0 < term.opacity <= 1.0


def _totalseg_names(shared_data: Path) -> list[str]:
    return list(json.loads(
        (shared_data / "totalseg-examples" / "label_map_total_v2.json").read_text()).values())


def test_every_label_of_every_model_resolves_to_a_code(shared_data: Path) -> None:
    """builtin_ct's labels and all 117 TotalSegmentator ``total`` classes."""
    names = [label.name for label in resolve("builtin_ct").structures]
    names += _totalseg_names(shared_data)
    assert len(names) == 5 + 117
    for name in names:
        term = term_for(name)
        assert term.name == name
        assert term.type.scheme_designator == term.category.scheme_designator == "SCT"
        assert term.type.value.isdigit() and term.label


def test_totalseg_table_is_exactly_the_total_task(shared_data: Path) -> None:
    assert set(TOTALSEG_TERMS) == set(_totalseg_names(shared_data))


def test_paired_structures_carry_their_side(shared_data: Path) -> None:
    sides = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}
    for name in [*_totalseg_names(shared_data), "lung_left", "lung_right"]:
        side = next((s for s in sides if f"_{s}" in name), None)
        term = term_for(name)
        coded = [c for c in (term.modifier, term.region_modifier) if c is not None]
        if side is None:
            assert not coded, name
        elif coded:
            assert [c.value for c in coded] == [sides[side][0]], name
        else:  # the concept itself is lateral, e.g. "Left auricular appendage"
            assert sides[side][1].lower() in term.type.meaning.lower(), name


def test_totalseg_codes_are_current_and_as_the_standard_spells_them() -> None:
    cid7151 = {getattr(codes.cid7151, n).value: getattr(codes.cid7151, n).meaning
               for n in codes.cid7151.dir()}
    listed = 0
    for name, term in TOTALSEG_TERMS.items():
        assert _in_context_group(7150, term.category), name
        assert term.category.value != "123037004"  # SNOMED's hierarchy root, not CID 7150
        if term.type.value in cid7151:
            listed += 1
            assert term.type.meaning == cid7151[term.type.value], name
        for modifier in (term.modifier, term.region_modifier):
            if modifier is not None:
                assert _in_context_group(244, modifier), name
    assert listed >= 80  # most classes are standard CID 7151 concepts
    # 29700009 is the *right* subclavian artery: both sides use the generic concept + laterality
    assert term_for("subclavian_artery_left").type.value == "36765005"
    cyst = term_for("kidney_cyst_left")
    assert (cyst.category.value, cyst.type.value, cyst.region.value) == (
        "49755003", "367643001", "64033007")


def test_colours_are_distinct_across_every_model() -> None:
    terms = all_terms()
    assert len({t.rgb for t in terms.values()}) == len(terms)
    assert len({t.cielab for t in terms.values()}) == len(terms)


def test_total_classes_are_in_totalsegmentators_value_order(shared_data: Path) -> None:
    mapping = json.loads(
        (shared_data / "totalseg-examples" / "label_map_total_v2.json").read_text())
    assert {str(value): name for value, name in enumerate(TOTAL_CLASSES, start=1)} == mapping
