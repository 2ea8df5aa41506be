"""A model's output names -> coded structures (``Label``): the one place a name gets its DICOM code.

Checked when a model is loaded (or listed), so a model with an uncoded structure fails at
start-up, not when its first SEG is written.
"""

from __future__ import annotations

from collections.abc import Mapping

from vesalius.inference.models import Label
from vesalius.inference.models.spec import ModelSpecError
from vesalius.inference.terminology import has_code

Structures = tuple[tuple[Label, ...], dict[int, int]]  # the labels, and output value -> label value


def normalise_label_name(name: str) -> str:
    """A model's class name in our label-name style: lower case, words joined by underscores."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def coded_structures(names: Mapping[int, str], label_map: Mapping[str, str], model: str) -> Structures:
    """Labels (value = channel) from the model's channel names, mapped to coded label names.

    Each name goes through ``label_map`` (the model's name -> ours), else is used as it is when
    coded (``vertebrae_S1``), else normalised (``Left Lung`` -> ``left_lung``); every resulting
    name must have a DICOM code.
    """
    if not names:
        raise ModelSpecError(f"model {model!r}: no labels (set labels = {{1 = \"liver\", ...}})")
    labels = []
    for channel, raw in sorted(names.items()):
        if channel == 0:
            continue
        name = label_map.get(raw) or (raw if has_code(raw) else normalise_label_name(raw))
        if not has_code(name):
            raise ModelSpecError(f"model {model!r}: output {channel} {raw!r} maps to label {name!r}, "
                                 "which has no DICOM code (add a label_map entry or a terminology row)")
        labels.append(Label(channel, name))
    if len(labels) > 255:
        raise ModelSpecError(f"model {model!r}: more than 255 labels")
    return tuple(labels), {label.value: label.value for label in labels}
