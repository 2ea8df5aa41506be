"""Deterministic output UIDs: a re-run replaces, a new model version adds."""

from __future__ import annotations

import pytest

from vesalius.dicom_out.identity import (
    MORPHOLOGICAL_OPERATIONS,
    SOFTWARE_VERSION,
    Algorithm,
    algorithm_identification,
    derived_uid,
)


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    algorithm = Algorithm("builtin_ct", "1")
    first = derived_uid("1.2.3.4", algorithm, "seg/series")
    assert first == derived_uid("1.2.3.4", Algorithm("builtin_ct", "1"), "seg/series")
    assert first.startswith("2.25.") and len(first) <= 64
    assert first[5:].isdigit()
    others = {
        derived_uid("1.2.3.5", algorithm, "seg/series"),
        derived_uid("1.2.3.4", Algorithm("builtin_ct", "2"), "seg/series"),
        derived_uid("1.2.3.4", Algorithm("other", "1"), "seg/series"),
        derived_uid("1.2.3.4", algorithm, "seg/instance"),
    }
    assert first not in others and len(others) == 4
    with pytest.raises(ValueError):
        derived_uid("", algorithm, "seg/series")


def test_the_algorithm_family_describes_but_does_not_identify() -> None:
    plain = Algorithm("builtin_ct", "1")
    described = Algorithm("builtin_ct", "1", family=MORPHOLOGICAL_OPERATIONS)
    assert plain == described
    assert derived_uid("1.2.3", plain, "seg/series") == derived_uid("1.2.3", described,
                                                                    "seg/series")
    item = algorithm_identification(described)[0]
    assert (item.AlgorithmName, item.AlgorithmVersion) == ("builtin_ct", "1")
    assert item.AlgorithmFamilyCodeSequence[0].CodeValue == "123104"


def test_software_version_is_the_installed_package_version() -> None:
    import importlib.metadata

    assert SOFTWARE_VERSION == importlib.metadata.version("vesalius")
