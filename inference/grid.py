"""Block pooling of voxel grids: a coarser grid whose voxels summarise whole blocks."""

from __future__ import annotations

import numpy as np


def pool(array: np.ndarray, factors: tuple[int, int, int], how: str) -> np.ndarray:
    """Block "mean" or "max" over factors, edge-padded to whole blocks; float32.

    Combining strided views element-wise is several times faster than reducing a reshaped
    array over its short block axes. The axis with the largest factor goes first, so the first
    (largest) copy is the smallest one; "max" copies in the input's dtype (an int16 CT: half a
    float32 copy), a "mean" of uint8 sums in uint16 where they fit. Sums of integers stay exact
    in float32 in any order below 2**24 (32 int16 values per block), so neither changes a mean
    of an integer volume.
    """
    if factors == (1, 1, 1):
        return array
    pad = [(0, (-n) % f) for n, f in zip(array.shape, factors, strict=True)]
    out = np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array
    combine = np.maximum if how == "max" else np.add
    # sums of uint8 blocks (the surfaces' 0/1 crops) fit uint16 when the block is small: exact,
    # and half the size of float32
    total = 255 * int(np.prod(factors))
    sums = np.uint16 if out.dtype in (np.uint8, np.bool_) and total < 2**16 else np.float32
    for axis in sorted(range(3), key=lambda a: -factors[a]):
        f = factors[axis]
        if f == 1:
            continue
        index = [slice(None)] * 3
        index[axis] = slice(0, None, f)
        result = out[tuple(index)].astype(out.dtype if how == "max" else sums, copy=True)
        for offset in range(1, f):
            index[axis] = slice(offset, None, f)
            combine(result, out[tuple(index)], out=result)
        out = result
    out = out.astype(np.float32, copy=False)
    if how == "mean":
        out /= float(np.prod(factors))
    return out
