"""Which transfer syntax the listener accepts when a sender offers several in one presentation
context: lossless compressed first, then Explicit, then Implicit VR Little Endian; a lossy syntax
only when nothing else is offered. The stored file keeps the syntax it was sent in.

Real senders against `vesalius serve`: a pynetdicom SCU proposing one context with several
syntaxes, and DCMTK storescu with ``+C`` (its proposals combined into one context)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.peers import DCMTK_ENV, NodeProcess, storescu, vesalius_node, wait_for
from tests.phantoms import Sphere, write_phantom_series
from vesalius.node.receive import ACCEPTED_SYNTAXES, LOSSLESS_COMPRESSED_SYNTAXES

NO_JOBS = '[[rules]]\nname = "none"\nmodality = ["NO_SUCH_MODALITY"]\n'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with vesalius_node(tmp_path_factory.mktemp("choice"), config=NO_JOBS) as running_node:
        yield running_node


def _one_slice(folder: Path) -> Path:
    phantom = write_phantom_series(folder, shape=(1, 64, 64), spacing=(2, 2, 2),
                                   objects=[Sphere((0, 0, 0), 20, 300)])
    return Path(phantom.paths[0])


def _stored_syntax(node: NodeProcess, sent: Path) -> str:
    ds = pydicom.dcmread(sent, stop_before_pixels=True)
    folder = node.data_dir / "spool" / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    [stored] = wait_for(lambda: (files := sorted(folder.glob("*.dcm"))) and files, 15, "the stored file")
    return str(pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _pynetdicom_send(node: NodeProcess, path: Path, offered: list[str]) -> str:
    """Send ``path`` offering ``offered`` in ONE presentation context; returns the accepted syntax."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, offered)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="VESALIUS")
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        accepted = str(context.transfer_syntax[0])
        ds = pydicom.dcmread(path)
        if accepted != str(ds.file_meta.TransferSyntaxUID):  # what a modality does: convert
            ds.decompress()
            if accepted == ImplicitVRLittleEndian:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    return accepted


def test_syntax_order_is_lossless_then_explicit_then_implicit_then_the_rest() -> None:
    order = list(ACCEPTED_SYNTAXES)
    explicit, implicit = order.index(ExplicitVRLittleEndian), order.index(ImplicitVRLittleEndian)
    assert all(order.index(uid) < explicit for uid in LOSSLESS_COMPRESSED_SYNTAXES)
    assert explicit < implicit < order.index(JPEGBaseline8Bit)
    assert order[-1] == "1.2.840.10008.1.2.2"  # retired big endian last
    for uid in LOSSLESS_COMPRESSED_SYNTAXES:  # preferred only when we can decode it at job time
        assert not UID(uid).is_compressed or get_decoder(uid).is_available, uid


def test_pynetdicom_offer_of_j2k_lossless_explicit_implicit_keeps_j2k(node: NodeProcess,
                                                                       tmp_path: Path) -> None:
    path = _one_slice(tmp_path / "j2k")
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    compressed = tmp_path / "j2k.dcm"
    ds.save_as(compressed, enforce_file_format=True)
    offered = [JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert _pynetdicom_send(node, compressed, offered) == JPEG2000Lossless
    assert _stored_syntax(node, compressed) == JPEG2000Lossless
    stored_size = sum(p.stat().st_size for p in (node.data_dir / "spool").rglob(f"*{ds.SOPInstanceUID}*"))
    assert 0 < stored_size < path.stat().st_size  # the compressed bytes, not the decompressed ones


def test_uncompressed_offered_first_still_gets_the_lossless_compressed(node: NodeProcess,
                                                                      tmp_path: Path) -> None:
    path = _one_slice(tmp_path / "rle")
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, generate_instance_uid=False)
    compressed = tmp_path / "rle.dcm"
    ds.save_as(compressed, enforce_file_format=True)
    offered = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless]  # the requestor's order
    assert _pynetdicom_send(node, compressed, offered) == RLELossless  # does not decide
    assert _stored_syntax(node, compressed) == RLELossless


def test_lossy_with_uncompressed_gets_explicit_and_lossy_alone_is_accepted(node: NodeProcess,
                                                                          tmp_path: Path) -> None:
    both = _one_slice(tmp_path / "both")
    assert _pynetdicom_send(node, both, [JPEGBaseline8Bit, ExplicitVRLittleEndian,
                                         ImplicitVRLittleEndian]) == ExplicitVRLittleEndian
    assert _stored_syntax(node, both) == ExplicitVRLittleEndian
    alone = _one_slice(tmp_path / "alone")
    lossy = tmp_path / "lossy.dcm"
    subprocess.run(["dcmcjpeg", "+eb", str(alone), str(lossy)], check=True, env=DCMTK_ENV)
    assert _pynetdicom_send(node, lossy, [JPEGBaseline8Bit]) == JPEGBaseline8Bit
    assert _stored_syntax(node, lossy) == JPEGBaseline8Bit


@pytest.mark.parametrize(("encoder", "syntax", "flag"), [
    (["dcmcjpls", "+el"], JPEGLSLossless, "-xt"),  # JPEG-LS lossless + all uncompressed
    (["dcmcjpeg", "+e1"], JPEGLosslessSV1, "-xs"),  # JPEG lossless SV1 + all uncompressed
])
def test_storescu_combined_proposal_keeps_the_compressed_syntax(node: NodeProcess, tmp_path: Path,
                                                                encoder: list[str], syntax: str,
                                                                flag: str) -> None:
    path = _one_slice(tmp_path / "dcmtk")
    compressed = tmp_path / "compressed.dcm"
    subprocess.run([*encoder, str(path), str(compressed)], check=True, env=DCMTK_ENV)
    # +C: one presentation context with the compressed syntax and the uncompressed ones, so the
    # acceptor's choice decides (without it storescu proposes one context per syntax)
    result = storescu([compressed], node.port, extra=[flag, "+C", "-R", "-d"])
    proposal = result.stderr.split("A-ASSOCIATE-RQ")[1]  # storescu's debug output
    assert proposal.count("(Proposed)") == 1 and "=LittleEndianImplicit" in proposal
    assert _stored_syntax(node, compressed) == syntax
