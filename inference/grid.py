"""Block pooling of voxel grids: a coarser grid whose voxels summarise whole blocks."""

from __future__ import annotations

import numpy as np


def pool(array: np.ndarray, factors: tuple[int, int, int], how: str) -> np.ndarray:
    """Block "mean" or "max" over factors, the last block of an axis cut by the edge filled with
    the edge value (as edge padding would, without the padded copy of the volume); float32.

    Combining strided views element-wise is several times faster than reducing a reshaped
    array over its short block axes. The axis with the largest factor goes first, so the first
    (largest) copy is the smallest one; "max" copies in the input's dtype (an int16 CT: half a
    float32 copy), a "mean" of uint8 sums in uint16 where they fit. Sums of integers stay exact
    in float32 in any order below 2**24 (32 int16 values per block), so neither changes a mean
    of an integer volume.
    """
    if factors == (1, 1, 1):
        return array
    combine = np.maximum if how == "max" else np.add
    # sums of uint8 blocks (the surfaces' 0/1 crops) fit uint16 when the block is small: exact,
    # and half the size of float32
    total = 255 * int(np.prod(factors))
    sums = np.uint16 if array.dtype in (np.uint8, np.bool_) and total < 2**16 else np.float32
    out = array
    for axis in sorted(range(3), key=lambda a: -factors[a]):
        f = factors[axis]
        if f == 1:
            continue
        n = out.shape[axis]
        result = out[_along(axis, slice(0, None, f))].astype(out.dtype if how == "max" else sums, copy=True)
        blocks = result.shape[axis]
        for offset in range(1, f):
            part = out[_along(axis, slice(offset, None, f))]
            whole = part.shape[axis]  # one short where the last block is cut by the edge:
            combine(result[_along(axis, slice(0, whole))], part, out=result[_along(axis, slice(0, whole))])
            if whole < blocks:  # that block takes the edge value again, as edge padding would
                cut = result[_along(axis, slice(whole, None))]
                combine(cut, out[_along(axis, slice(n - 1, n))], out=cut)
        out = result
    out = out.astype(np.float32, copy=False)
    if how == "mean":
        out /= float(np.prod(factors))
    return out


def _along(axis: int, part: slice) -> tuple[slice, ...]:
    """An index of a 3-D array that takes ``part`` along ``axis`` and everything along the others."""
    return tuple(part if a == axis else slice(None) for a in range(3))
