"""The deployment benchmark refuses what it cannot measure honestly, in one line: a folder
that is not the export of its checkpoint, a file changed since the export, a runtime it does
not know. (Its measurements are in benchmarks/RESULTS.md.)"""

from __future__ import annotations

import hashlib
import json

import pytest

from benchmarks import deploy


def fake_export(folder, checkpoint, files):
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    card = {
        "source": {"sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()},
        "files": {name: len(content) for name, content in files.items()},
    }
    (folder / "card.json").write_text(json.dumps(card))


def run(capsys, *args):
    with pytest.raises(SystemExit) as stopped:
        deploy.main(list(args))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return stopped.value.code, err


def test_a_folder_exported_from_another_checkpoint_is_refused(tmp_path, capsys):
    checkpoint, other = tmp_path / "a.pth", tmp_path / "b.pth"
    checkpoint.write_bytes(b"one network")
    other.write_bytes(b"another network")
    fake_export(tmp_path / "export", other, {"model.onnx": b"x", "model_int8.onnx": b"y"})
    code, err = run(
        capsys, f"--onnx_dir={tmp_path / 'export'}", f"--checkpoint={checkpoint}",
        "--runtimes=onnxruntime",
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "is not an export of --checkpoint" in err[0]


def test_a_file_changed_since_the_export_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "a.pth"
    checkpoint.write_bytes(b"one network")
    fake_export(tmp_path / "export", checkpoint, {"model.onnx": b"x", "model_int8.onnx": b"y"})
    (tmp_path / "export" / "model.onnx").write_bytes(b"something else")
    code, err = run(
        capsys, f"--onnx_dir={tmp_path / 'export'}", f"--checkpoint={checkpoint}",
        "--runtimes=onnxruntime",
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "model.onnx is missing or not the file" in err[0]


def test_an_unknown_runtime_is_refused(tmp_path, capsys):
    code, err = run(capsys, "--runtimes=onnxruntime,tensorrt")
    assert code == 2 and len(err) == 1 and "unknown tensorrt" in err[0]


def test_litert_needs_the_tflite_files(tmp_path, capsys):
    checkpoint = tmp_path / "a.pth"
    checkpoint.write_bytes(b"one network")
    fake_export(tmp_path / "export", checkpoint, {"model.onnx": b"x", "model_int8.onnx": b"y"})
    code, err = run(
        capsys, f"--onnx_dir={tmp_path / 'export'}", f"--checkpoint={checkpoint}",
        "--runtimes=litert",
    )  # fmt: skip
    assert code == 2 and len(err) == 1 and "--format=onnx,tflite" in err[0]
