"""The model-package schema refuses broken packages with messages that say what is wrong."""

import json
import shutil

import pytest

from modelpack.manifest import MANIFEST_FILE, Manifest, PackageError, load_manifest
from modelpack.sweep import expected_at


def _edit(package, tmp_path, change):
    dst = tmp_path / "pkg"
    shutil.copytree(package, dst)
    data = json.loads((dst / MANIFEST_FILE).read_text())
    change(data)
    (dst / MANIFEST_FILE).write_text(json.dumps(data))
    return dst


def test_valid_package_loads(synthetic_package):
    m = load_manifest(synthetic_package)
    assert isinstance(m, Manifest)
    assert expected_at(m, 0.75).sweep_taus == (0.7, 0.8)  # between rows: the two neighbours
    assert expected_at(m, 1.0).sweep_taus == (1.0,)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["clusters"][0]["classes"].append(999), "out of range"),
    (lambda d: d["clusters"].pop(), "not in any cluster|must be"),
    (lambda d: d.update(clustifier_confusion=[[1]]), "clustifier_confusion"),
    (lambda d: d["input"].update(std=[0.2, 0.0, 0.2]), "std"),
    (lambda d: d["trunk"].update(file="../trunk.onnx"), "plain file name"),
    (lambda d: d["extra_files"].update({"../../etc/passwd": "0" * 64}), "plain file name"),
    (lambda d: d["extra_files"].update({"/proc/self/pagemap": "0" * 64}), "plain file name"),
    (lambda d: d.update(surprise=1), "Extra inputs"),
    (lambda d: d["activator"].update(default_tau=1.5), "default_tau"),
    (lambda d: d["activator"].update(fill="clustifier"), "needs a clustifier with class logits"),
])
def test_schema_errors(synthetic_package, tmp_path, change, message):
    with pytest.raises(PackageError, match=message):
        load_manifest(_edit(synthetic_package, tmp_path, change))


def test_checksum_mismatch_and_missing_file(synthetic_package, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(synthetic_package, dst)
    with (dst / "head0.onnx").open("ab") as f:
        f.write(b"\0")
    (dst / "clustifier.onnx").unlink()
    with pytest.raises(PackageError) as e:
        load_manifest(dst)
    assert "sha256 mismatch for head0.onnx" in str(e.value)
    assert "missing file clustifier.onnx" in str(e.value)
    load_manifest(dst, verify=False)  # schema alone still fine


def test_only_regular_files_inside_the_package_are_read(synthetic_package, tmp_path):
    """A FIFO would block the read forever (the attack named /proc/self/pagemap); a symlink out
    of the package would hash someone else's file. Both are refused with one message, unread."""
    import os

    outside = tmp_path / "secret.txt"
    outside.write_text("not the package's")
    dst = _edit(synthetic_package, tmp_path, lambda d: d["extra_files"].update(
        {"blocker": "0" * 64, "escape.txt": "0" * 64}))
    os.mkfifo(dst / "blocker")
    (dst / "escape.txt").symlink_to(outside)
    with pytest.raises(PackageError) as e:
        load_manifest(dst)  # returns at once: the FIFO is never opened
    assert "blocker is not a regular file inside the package" in str(e.value)
    assert "escape.txt is not a regular file inside the package" in str(e.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(PackageError, match="no manifest.json"):
        load_manifest(tmp_path)
