"""The SEG writer's fast path: the same objects plain highdicom writes, voxel for voxel.

``build_seg`` gives highdicom the label map with which values each segment holds, each frame's
mask made as it is encoded, and checks overlap without highdicom's int64 copy
(dicom_out.seg_overlap). The
reference here is highdicom's own ``Segmentation`` fed the plain (slices, rows, cols, segments)
stack of full masks, the way the writer did it before.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.dicom_checks import assert_dciodvfy_clean
from tests.dicom_out_inputs import LABELS, phantom_volume
from tests.test_volume import write_enhanced
from vesalius.dicom_out import seg as seg_module
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import LABELMAP, build_seg
from vesalius.dicom_out.seg_overlap import Segmentation, SegmentMasks, segments_overlap
from vesalius.inference.series import load_series
from vesalius.inference.volume import Volume

ALGORITHM = Algorithm("builtin_ct", "1")


def _plain_stack(label_map: np.ndarray, present) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([label.mask(label_map) for label in present], axis=-1)


def plain_highdicom(volume: Volume, label_map: np.ndarray, monkeypatch: pytest.MonkeyPatch,
                    segmentation_type: str = "BINARY", structures=LABELS) -> pydicom.Dataset:  # type: ignore[no-untyped-def]
    """The SEG as highdicom alone writes it: its own class, full-volume masks stacked last."""
    with monkeypatch.context() as patch:
        patch.setattr(seg_module, "Segmentation", hd.seg.Segmentation)
        patch.setattr(seg_module, "_binary_stack", _plain_stack)
        return build_seg(volume, label_map, structures, ALGORITHM,
                         segmentation_type=segmentation_type)


def decoded_masks(path: Path, volume: Volume) -> np.ndarray:
    return hd.seg.segread(path).get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.sources],
        combine_segments=False).astype(bool)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, np.ndarray]:
    return phantom_volume(tmp_path_factory.mktemp("phantom"))


def _same_object(ours: pydicom.Dataset, theirs: pydicom.Dataset) -> None:
    assert ours.SegmentsOverlap == theirs.SegmentsOverlap
    assert ours.NumberOfFrames == theirs.NumberOfFrames
    assert ours.PixelData == theirs.PixelData
    assert ours.PerFrameFunctionalGroupsSequence == theirs.PerFrameFunctionalGroupsSequence
    assert ours.SegmentSequence == theirs.SegmentSequence


def test_binary_seg_is_what_plain_highdicom_writes_and_decodes_to_the_label_map(
        phantom: tuple[Volume, np.ndarray], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    volume, label_map = phantom
    ours = build_seg(volume, label_map, LABELS, ALGORITHM)
    _same_object(ours, plain_highdicom(volume, label_map, monkeypatch))
    assert ours.SegmentsOverlap == "YES"  # the body contains the lungs and the bone
    path = tmp_path / "seg.dcm"
    ours.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    present = [label for label in LABELS if label.mask(label_map).any()]
    masks = decoded_masks(path, volume)
    for number, label in enumerate(present):
        np.testing.assert_array_equal(masks[..., number], label.mask(label_map))
    body = masks[..., 0]
    assert (body & masks[..., 1]).any() and body.sum() == np.count_nonzero(label_map)


def test_labelmap_seg_is_what_plain_highdicom_writes(
        phantom: tuple[Volume, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    volume, label_map = phantom
    ours = build_seg(volume, label_map, LABELS, ALGORITHM, segmentation_type=LABELMAP)
    theirs = plain_highdicom(volume, label_map, monkeypatch, LABELMAP)
    assert ours.PixelData == theirs.PixelData
    assert ours.PerFrameFunctionalGroupsSequence == theirs.PerFrameFunctionalGroupsSequence


def test_non_overlapping_segments_say_so(phantom: tuple[Volume, np.ndarray],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    volume, label_map = phantom
    organs = LABELS[1:]  # without the body nothing overlaps
    ours = build_seg(volume, label_map, organs, ALGORITHM)
    _same_object(ours, plain_highdicom(volume, label_map, monkeypatch, structures=organs))
    assert ours.SegmentsOverlap == "NO"


def test_enhanced_ct_source_frames_keep_their_order(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    single, label_map = phantom_volume(tmp_path / "ct")
    enhanced = load_series([write_enhanced(sorted((tmp_path / "ct").glob("*.dcm")),
                                           tmp_path / "enhanced")])
    np.testing.assert_array_equal(enhanced.array, single.array)
    ours = build_seg(enhanced, label_map, LABELS, ALGORITHM)
    _same_object(ours, plain_highdicom(enhanced, label_map, monkeypatch))


@pytest.mark.parametrize("segments", [1, 3, 300])
def test_overlap_count_matches_the_plain_sum(segments: int) -> None:
    rng = np.random.default_rng(segments)
    frames = 40  # more than one block of frames
    stack = np.zeros((segments, frames, 6, 5), np.uint8)
    for s in range(segments):  # each segment its own pixel: no overlap
        stack[s, :, (s // 5) % 6, s % 5] = s < 30
    view = np.moveaxis(stack, 0, -1)
    assert segments_overlap(view) == bool((view.sum(axis=-1) > 1).any())
    assert not segments_overlap(view)
    if segments > 1:
        frame = int(rng.integers(17, frames))  # in a later block
        stack[segments - 1, frame, 0, 0] = 1  # the first segment's pixel too
        assert segments_overlap(view) == bool((view.sum(axis=-1) > 1).any()) is True


def test_non_binary_stacks_are_refused_like_highdicom() -> None:
    pixels = np.zeros((2, 4, 4, 2), np.uint8)
    pixels[0, 0, 0, 0] = 2
    numbers = np.array([1, 2])
    for cls in (Segmentation, hd.seg.Segmentation):
        with pytest.raises(ValueError, match="must be binary"):
            cls._check_and_cast_pixel_array(pixels, numbers, hd.seg.SegmentationTypeValues.BINARY,
                                            np.uint8)


def test_segment_masks_stand_for_the_stacked_masks() -> None:
    rng = np.random.default_rng(7)
    label_map = rng.integers(0, 5, (40, 6, 5)).astype(np.uint8)  # more than one block of frames
    members = np.zeros((3, 256), np.uint8)
    members[1, [1, 2, 3]] = 1  # a structure that includes two others
    members[2, 3] = 1  # one of them on its own: overlaps segment 1
    masks = SegmentMasks(label_map, members)
    stack = np.stack([np.isin(label_map, [1, 2, 3]), label_map == 3], axis=-1).astype(np.uint8)
    for segment in (1, 2):
        for frame in (0, 17, 39):
            np.testing.assert_array_equal(masks[frame].frame_mask(segment), stack[frame, ..., segment - 1])
    assert masks.overlap() == segments_overlap(stack) is True
    label_map[label_map == 3] = 4  # the shared value gone: no voxel is in two segments
    assert SegmentMasks(label_map, members).overlap() is False


def test_segment_masks_are_refused_where_they_do_not_fit() -> None:
    masks = SegmentMasks(np.zeros((2, 4, 4), np.uint8), np.zeros((3, 256), np.uint8))
    types = hd.seg.SegmentationTypeValues
    with pytest.raises(ValueError, match="2 segments; 3 are described"):
        Segmentation._check_and_cast_pixel_array(masks, np.array([1, 2, 3]), types.BINARY, np.uint8)
    with pytest.raises(ValueError, match="BINARY"):
        Segmentation._check_and_cast_pixel_array(masks, np.array([1, 2]), types.LABELMAP, np.uint8)
    with pytest.raises(ValueError, match="uint8 label map"):
        SegmentMasks(np.zeros((2, 4, 4), np.int16), np.zeros((3, 256), np.uint8))
