"""highdicom's Segmentation with a memory-light overlap check (a fix that could go upstream).

highdicom 0.28 decides Segments Overlap for a (frames, rows, cols, segments) binary array with
``array.sum(axis=-1)``: an int64 copy eight times the size of the whole array (630 MB for
300 slices of 512x512), summed along the short, innermost axis (1.5 s). Here the same answer is
counted a block of frames at a time in uint8/uint16, which is exact (a count only has to exceed
1) and needs a few MB. Every other input, and every other check, is highdicom's own.

Pass the array as a view whose segment axis is the slowest (``np.moveaxis(stack, 0, -1)`` of a
(segments, frames, rows, cols) stack): each frame of one segment is then contiguous, and
highdicom's per-frame extraction copies nothing.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np

FRAMES_PER_BLOCK = 16  # 16 frames of 512x512 in uint8: 4 MB of counts at a time


def segments_overlap(pixel_array: np.ndarray) -> bool:
    """Whether any pixel of a (frames, rows, cols, segments) 0/1 array is in two segments."""
    segments = pixel_array.shape[-1]
    dtype = np.uint8 if segments < np.iinfo(np.uint8).max else np.uint16
    for start in range(0, pixel_array.shape[0], FRAMES_PER_BLOCK):
        block = pixel_array[start:start + FRAMES_PER_BLOCK]
        counts = block[..., 0].astype(dtype)
        for segment in range(1, segments):
            np.add(counts, block[..., segment], out=counts)
        if counts.max(initial=0) > 1:
            return True
    return False


class Segmentation(hd.seg.Segmentation):
    """``highdicom.seg.Segmentation``; only the overlap check of 4-D BINARY/FRACTIONAL integer
    arrays differs (same result, no int64 copy)."""

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array: Any, segment_numbers: np.ndarray,
                                    segmentation_type: hd.seg.SegmentationTypeValues,
                                    dtype: type) -> tuple[Any, hd.seg.SegmentsOverlapValues]:
        if (not isinstance(pixel_array, np.ndarray) or pixel_array.ndim != 4
                or pixel_array.dtype not in (np.bool_, np.uint8, np.uint16)
                or segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP
                or pixel_array.shape[-1] != len(segment_numbers)):
            return super()._check_and_cast_pixel_array(
                pixel_array, segment_numbers, segmentation_type, dtype)
        max_pixel = pixel_array.max(initial=0)
        if max_pixel > 1:
            raise ValueError("When passing a 4D stack of segments with an integer pixel type, "
                             "the pixel array must be binary.")
        if max_pixel == 0 or pixel_array.shape[-1] == 1 or not segments_overlap(pixel_array):
            return pixel_array, hd.seg.SegmentsOverlapValues.NO
        return pixel_array, hd.seg.SegmentsOverlapValues.YES
