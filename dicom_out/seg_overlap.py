"""highdicom's Segmentation without its memory-hungry BINARY paths (fixes that could go upstream).

1. **Frames from a label map.** Overlapping segments (the body contains the lungs) cannot be one
   label map, so highdicom 0.28 takes them as a (frames, rows, cols, segments) stack of masks:
   one full-volume mask per segment (4 segments of 300x512x512: 315 MB) beside the label map it
   came from. :class:`SegmentMasks` stands for that stack: it is the label map itself with a
   lookup table saying which label values belong to each segment, and the mask of one segment
   on one frame is made only when highdicom encodes that frame (one gather of 512x512 bytes).
2. **The overlap check.** For a 4-D stack highdicom decides Segments Overlap with
   ``array.sum(axis=-1)``: an int64 copy eight times the size of the whole array (630 MB for
   300 slices of 512x512). Here the same answer is counted a block of frames at a time in
   uint8/uint16 (exact: a count only has to exceed 1); for :class:`SegmentMasks` it is read from
   the lookup table and the values present.

Pass a plain stack as a view whose segment axis is the slowest (``np.moveaxis(stack, 0, -1)``
of a (segments, frames, rows, cols) stack): each frame of one segment is then contiguous, and
highdicom's per-frame extraction copies nothing. Every other input, and every other check, is
highdicom's own; the objects are byte for byte those highdicom writes from the full stack
(tests/test_seg_fast_path.py).
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np

FRAMES_PER_BLOCK = 16  # 16 frames of 512x512 in uint8: 4 MB of counts at a time


class SegmentMasks(np.ndarray):
    """A (frames, rows, cols) uint8 label map standing for its segments' stacked 0/1 masks:
    ``members[s, v]`` is 1 when label value ``v`` belongs to segment number ``s`` (row 0 unused),
    so segment ``s`` on frame ``i`` is ``members[s][label_map[i]]``."""

    members: np.ndarray

    def __new__(cls, label_map: np.ndarray, members: np.ndarray) -> SegmentMasks:
        if label_map.ndim != 3 or label_map.dtype != np.uint8:
            raise ValueError("SegmentMasks needs a (frames, rows, cols) uint8 label map")
        if members.ndim != 2 or members.shape[1] != 256 or members.dtype != np.uint8 or members.max() > 1:
            raise ValueError("members must be a (segments + 1, 256) 0/1 uint8 lookup table")
        masks = np.asarray(label_map).view(cls)
        masks.members = members
        return masks

    def __array_finalize__(self, obj: Any) -> None:  # views and copies keep the table
        self.members = getattr(obj, "members", None)  # type: ignore[assignment]

    @property
    def segments(self) -> int:
        return int(self.members.shape[0]) - 1

    def frame_mask(self, segment_number: int) -> np.ndarray:
        """The 0/1 uint8 mask of one segment on this (rows, cols) frame: a comparison for a
        segment of one label value (40x faster), else a gather through the lookup table."""
        row = self.members[segment_number]
        frame = np.asarray(self)
        values = np.flatnonzero(row)
        if len(values) == 1:
            equal: np.ndarray = np.equal(frame, values[0])
            return equal.view(np.uint8)
        mask: np.ndarray = np.take(row, frame)
        return mask

    def overlap(self) -> bool:
        """Whether a voxel is in two segments: it holds a label value that belongs to two
        (looked up a block of frames at a time, stopping at the first)."""
        shared = self.members[1:].sum(axis=0) > 1
        if not shared.any():
            return False
        frames = np.asarray(self)
        return any(shared[frames[start:start + FRAMES_PER_BLOCK]].any()
                   for start in range(0, frames.shape[0], FRAMES_PER_BLOCK))


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
    """``highdicom.seg.Segmentation`` that also takes :class:`SegmentMasks` for a BINARY SEG, and
    checks the overlap of 4-D BINARY/FRACTIONAL integer arrays without an int64 copy."""

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array: Any, segment_numbers: np.ndarray,
                                    segmentation_type: hd.seg.SegmentationTypeValues,
                                    dtype: type) -> tuple[Any, hd.seg.SegmentsOverlapValues]:
        if isinstance(pixel_array, SegmentMasks):
            if segmentation_type != hd.seg.SegmentationTypeValues.BINARY:
                raise ValueError("SegmentMasks are for a BINARY segmentation")
            if pixel_array.segments != len(segment_numbers):
                raise ValueError(f"SegmentMasks hold {pixel_array.segments} segments; "
                                 f"{len(segment_numbers)} are described")
            overlaps = hd.seg.SegmentsOverlapValues
            return pixel_array, overlaps.YES if pixel_array.overlap() else overlaps.NO
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

    @staticmethod
    def _get_segment_pixel_array(pixel_array: np.ndarray, segment_number: int,
                                 described_segment_numbers: np.ndarray,
                                 segmentation_type: hd.seg.SegmentationTypeValues,
                                 max_fractional_value: int, dtype: type) -> np.ndarray:
        if isinstance(pixel_array, SegmentMasks):  # one frame of one segment, made now
            return pixel_array.frame_mask(segment_number).astype(dtype, copy=False)
        return hd.seg.Segmentation._get_segment_pixel_array(
            pixel_array, segment_number, described_segment_numbers, segmentation_type,
            max_fractional_value, dtype)
