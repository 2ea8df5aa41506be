"""An engine's class values on the source grid -> our label map (uint8), for the in-process adapters."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def to_label_map(engine: str, classes: np.ndarray, channels: Mapping[int, int],
                 shape: tuple[int, ...]) -> np.ndarray:
    """``classes`` (the engine's class values) through ``channels`` (class -> label value).

    RuntimeError naming ``engine`` when its output is not on the volume's grid.
    """
    classes = np.asarray(classes)
    if classes.shape != tuple(shape):
        raise RuntimeError(f"{engine} returned shape {classes.shape}, the volume is {tuple(shape)}")
    lut = np.zeros(max(int(classes.max(initial=0)), max(channels, default=0)) + 1, dtype=np.uint8)
    for value, ours in channels.items():
        lut[value] = ours
    return lut[classes.astype(np.int64)]
