"""Bad artifacts: every problem is a clear ``ValueError`` naming the file, and nothing in a
file is ever unpickled or executed."""

from __future__ import annotations

import builtins
import json
import pickle
import struct

import pytest
import torch
from export_helpers import (
    TinyNet,
    build_model,
    rel_diff,
)

from ddq.deploy import export, load, read_artifact
from ddq.deploy.manifest import (
    DIGEST_KEY,
    FORMAT_VERSION,
    MANIFEST_KEY,
    TABLES_KEY,
    checksum,
)

pytestmark = pytest.mark.usefixtures("one_thread")

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A valid artifact (per-channel weights) and the model it came from."""
    net, _ = build_model("mixed")
    path = tmp_path_factory.mktemp("art") / "good.ddq.safetensors"
    export(net, path, arch={"name": "small_cnn", "kwargs": {"num_classes": 10}})
    return path, net


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, tensor data) of a safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def rewrite(
    src, dst, edit_manifest=None, edit_tensors=None, fix_checksums=False, version=FORMAT_VERSION
) -> None:
    """Re-save an artifact with an edited manifest/tensors and a *valid* digest, as a
    careless tool would: only the consistency checks can catch it. ``fix_checksums``: also
    recompute the tensor checksums, so only the checks on the values can. ``version``: the
    manifest version to write (the edits see that version's layout)."""
    manifest, tensors = read_artifact(src)
    tensors = manifest.stored_tensors(tensors, version)
    manifest.checksums = {k: checksum(t) for k, t in tensors.items()}
    d = json.loads(manifest.to_json(version))
    if edit_manifest:
        edit_manifest(d)
    if edit_tensors:
        edit_tensors(tensors)
    if fix_checksums:
        sums = {k: checksum(t) for k, t in tensors.items()}
        if version >= 3:  # one 16-digit checksum per tensor, in the manifest's order
            d["h"] = "".join(sums[k] for k in manifest.expected_tensors(3))
        else:
            d["checksums"] = sums
    text = json.dumps(d)
    meta = {MANIFEST_KEY: text, DIGEST_KEY: checksum(text.encode())}
    dst.write_bytes(safetensors_torch.save(tensors, metadata=meta))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 20, -1000, -1])
def test_truncated_artifact(tmp_path, artifact, keep):
    path, net = artifact
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*(truncated|corrupt)") as e:
        load(bad, model=net)
    assert str(bad) in str(e.value)


def test_flipped_byte_in_tensor_data_is_caught_by_the_checksum(tmp_path, artifact):
    path, net = artifact
    header, body = split(path.read_bytes())
    start, _ = header["ddq.indices"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[len(data) - len(body) + start] ^= 0x10  # one bit of one packed index
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flip\.safetensors: checksum mismatch.*'ddq\.indices'"):
        load(bad, model=net)


def test_edited_manifest_is_caught_by_its_digest(tmp_path, artifact):
    path, net = artifact
    data = path.read_bytes()
    i = data.index(b'\\"b\\":') + 6  # a bit count, inside the manifest string of the header
    assert data[i : i + 1] in b"12345678"
    digit = b"5" if data[i : i + 1] != b"5" else b"4"
    bad = tmp_path / "edit.safetensors"
    bad.write_bytes(data[:i] + digit + data[i + 1 :])  # same length: the header parses
    with pytest.raises(ValueError, match=r"edit\.safetensors: the manifest's checksum"):
        load(bad, model=net)


def test_unknown_format_version(tmp_path, artifact):
    path, net = artifact
    bad = tmp_path / "v99.safetensors"
    rewrite(path, bad, edit_manifest=lambda d: d.update(format_version=99))
    with pytest.raises(ValueError, match=r"v99\.safetensors: unknown artifact format version 99"):
        load(bad, model=net)


def _w(layer: str):
    """For edits of a version 3 manifest: a layer's weight fields (over the defaults)."""
    return lambda d: d["l"][layer].setdefault("w", {})


def _i(layer: str):
    """For edits of a version 3 manifest: a layer's input fields (over the defaults)."""
    return lambda d: d["l"][layer].setdefault("i", {})


@pytest.mark.parametrize(
    ("version", "edit_manifest", "edit_tensors", "problem"),
    [
        (3, None, lambda t: t.pop("ddq.indices"), r"missing tensors \['ddq\.indices'\]"),
        (2, None, lambda t: t.pop("fc.weight.idx"), r"missing tensors \['fc\.weight\.idx'\]"),
        (3, None, lambda t: t.update(extra=torch.zeros(2)), r"does not describe \['extra'\]"),
        (3, lambda d: _w("pw")(d).update(b=3), None, r"'ddq\.indices' is torch\.uint8 \(\d+,\)"),
        (2, lambda d: d["layers"]["pw"]["weight"].update(bits=3), None, "'pw.weight.idx' is"),
        (
            3,
            None,
            lambda t: t.update({TABLES_KEY: t[TABLES_KEY].double()}),
            "'ddq.tables' is torch.float64",
        ),
        (3, lambda d: d.update(h=d["h"][:-16]), None, "checksums do not cover every tensor"),
        (3, lambda d: d.update(h=d["h"].upper()), None, "checksums must be lowercase hex"),
        (3, lambda d: _w("fc")(d).update(m="int4"), None, r"l\['fc'\]\.w\.m is 'int4'"),
        (3, lambda d: d["l"]["fc"].pop("s"), None, "lacks the field 's'"),
        (3, lambda d: d["l"]["fc"].update(s=[10, 12, 1, 1, 1]), None, "not a Conv1d, Conv2d"),
        (3, lambda d: d["l"]["fc"].update(x=1), None, r"unknown fields \['x'\]"),
        (3, lambda d: _i("fc")(d).update(b=True), None, "i.b has the wrong type"),
        (3, lambda d: _w("fc")(d).update(p=1), None, "w.p has the wrong type"),
        (3, lambda d: _i("fc")(d).update(p=True), None, "activations are never per_channel"),
        (3, lambda d: d["l"]["dw"]["k"].update(s=[2]), None, r"k\.s must be an int or 2 ints"),
        (3, lambda d: d["l"]["dw"]["k"].update(q=1), None, r"unknown settings \['q'\]"),
        (3, lambda d: d["n"].update(bn=0), None, r"n\.bn is 0, expected >= 1"),
        # Per-tensor weights read from a per-channel file: its tables are too long.
        (
            3,
            lambda d: _w("pw")(d).update(p=False),
            None,
            r"'ddq\.tables' is torch\.float32 \(\d+,\), the manifest implies",
        ),
        # The version 2 layout, still read.
        (2, lambda d: d["layers"]["dw"].update(offset=0), None, "slices overlap or leave gaps"),
        (2, lambda d: d["checksums"].pop("ddq.tables"), None, "checksums do not cover"),
        (2, lambda d: d["layers"]["fc"]["weight"].update(mode="int4"), None, "mode is 'int4'"),
        (
            2,
            lambda d: d["layers"]["fc"].pop("weight_shape"),
            None,
            "lacks the field 'weight_shape'",
        ),
        (2, lambda d: d.update(format_version=1), None, "version 1 has no per-channel weights"),
        (3, lambda d: d.update(format_version=2), None, "lacks the field 'layers'"),
    ],
)
def test_manifest_and_tensors_that_disagree(
    tmp_path, artifact, version, edit_manifest, edit_tensors, problem
):
    path, net = artifact
    bad = tmp_path / "disagree.safetensors"
    rewrite(path, bad, edit_manifest, edit_tensors, version=version)
    with pytest.raises(ValueError, match=r"disagree\.safetensors: ") as e:
        load(bad, model=net)
    assert e.match(problem)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_channel_scales_must_be_finite_and_positive(tmp_path, artifact, bad):
    path, net = artifact
    manifest, _ = read_artifact(path)
    at = manifest.layers["dw"].offset + manifest.layers["dw"].weight.levels + 3  # channel 3

    def edit(tensors):
        tensors[TABLES_KEY] = tensors[TABLES_KEY].clone()
        tensors[TABLES_KEY][at] = bad

    bad_path = tmp_path / "scale.safetensors"
    rewrite(path, bad_path, edit_tensors=edit, fix_checksums=True)
    with pytest.raises(
        ValueError, match=r"scale\.safetensors: .*'dw' has channel scales that are not all finite"
    ):
        load(bad_path, model=net)


@pytest.mark.parametrize(("version", "per_channel"), [(1, False), (2, False), (2, True)])
def test_older_format_versions_still_load(tmp_path, version, per_channel):
    """Versions 1 (per-tensor weights only) and 2 had the tensors of version 3 and a longer
    manifest."""
    net, x = build_model("mixed", per_channel=per_channel)
    path, old = tmp_path / "v3.safetensors", tmp_path / f"v{version}.safetensors"
    export(net, path)
    rewrite(path, old, version=version)
    manifest, _ = read_artifact(old)
    assert manifest.format_version == version
    assert manifest.layers == read_artifact(path)[0].layers
    with torch.no_grad():
        assert torch.equal(load(old, model=net)(x), net(x))
        assert rel_diff(load(old, model=net, kernel="reference")(x), net(x)) <= 1e-5


def test_architecture_that_does_not_match(tmp_path, artifact):
    path, _ = artifact
    with pytest.raises(
        ValueError, match=r"good\.ddq\.safetensors: the architecture does not match.*'conv'.*shape"
    ):
        load(path, model=TinyNet(in_channels=1))
    # The recorded registry model (small_cnn) is not the exported TinyNet.
    with pytest.raises(ValueError, match="the architecture does not match"):
        load(path)
    other = tmp_path / "unknown_arch.safetensors"
    rewrite(path, other, edit_manifest=lambda d: d.update(a={"name": "nonet"}))
    with pytest.raises(
        ValueError, match=r"unknown_arch\.safetensors: cannot build.*unknown model 'nonet'"
    ):
        load(other)
    none = tmp_path / "no_arch.safetensors"
    rewrite(path, none, edit_manifest=lambda d: d.pop("a"))
    with pytest.raises(
        ValueError, match=r"no_arch\.safetensors: the artifact records no architecture"
    ):
        load(none)
    # A factory gets the recorded architecture (None here) instead of the registry.
    runtime = load(none, model_factory=lambda arch: TinyNet() if arch is None else None)
    assert runtime.ddq_manifest.architecture is None


def test_plain_safetensors_file_is_not_an_artifact(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(
        ValueError, match=r"weights\.safetensors: a safetensors file without a ddq manifest"
    ):
        load(path, model=TinyNet())


class Payload:
    """Unpickling this creates a file: the side effect the tests watch for."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail loudly if anything tries to unpickle while loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def test_pickle_file_renamed_to_an_artifact_is_never_executed(
    tmp_path, monkeypatch, no_unpickling, artifact
):
    _, net = artifact
    marker = tmp_path / "pwned"
    for name, legacy in (("model.ddq.safetensors", False), ("legacy.ddq", True)):
        bad = tmp_path / name
        with bad.open("wb") as f:
            torch.save(Payload(str(marker)), f, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError, match=rf"{name}: not a ddq artifact.*never unpickles"):
            load(bad, model=net)
        with pytest.raises(ValueError, match=name):
            read_artifact(bad)
    assert not marker.exists()
    monkeypatch.undo()  # the unpicklers are back: the payload is live, torch.load runs it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_pickle_bytes_spliced_into_tensor_data_are_never_executed(
    tmp_path, monkeypatch, no_unpickling, artifact
):
    path, net = artifact
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(str(marker)))
    header, body = split(path.read_bytes())
    start, end = header[TABLES_KEY]["data_offsets"]
    assert end - start >= len(payload)
    data = bytearray(path.read_bytes())
    at = len(data) - len(body) + start
    data[at : at + len(payload)] = payload
    bad = tmp_path / "spliced.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"spliced\.safetensors: checksum mismatch for tensor 'ddq\.tables'"
    ):
        load(bad, model=net)
    assert not marker.exists()
    monkeypatch.undo()  # the unpicklers are back: the payload is live
    pickle.loads(payload)
    assert marker.exists()
