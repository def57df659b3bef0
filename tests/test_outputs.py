"""moekit/outputs.py: every file is written whole or not at all, never over an existing one without leave."""

from __future__ import annotations

import json
import os
import stat

import pytest

from moekit import outputs
from moekit.errors import MoekitError
from moekit.outputs import atomic_open, save_figure, save_tensors, write_json, write_text


def test_write_json_and_text(tmp_path):
    p = write_json(tmp_path / "sub" / "r.json", {"a": [1, 2], "b": None})
    assert p.read_text() == json.dumps({"a": [1, 2], "b": None}, indent=2) + "\n"
    assert json.loads(write_json(tmp_path / "one.json", {"a": 1}, indent=1).read_text()) == {"a": 1}
    t = write_text(tmp_path / "r.md", "| é |\n")
    assert t.read_bytes() == "| é |\n".encode()
    with pytest.raises(MoekitError, match="already exists: pass --overwrite"):
        write_text(t, "new\n")
    assert t.read_text() == "| é |\n"
    write_text(t, "new\n", overwrite=True)
    assert t.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == ["one.json", "r.md", "sub"]


def test_new_files_get_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(write_text(tmp_path / "atomic", "x").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failure_mid_write_leaves_the_old_file(tmp_path):
    p = write_json(tmp_path / "r.json", {"old": True})
    before = p.read_text()
    # json.dump streams: "{"a": 1, "b": " is already in the temporary file when the object fails to serialise
    with pytest.raises(TypeError):
        write_json(p, {"a": 1, "b": object()}, overwrite=True)
    assert p.read_text() == before
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_failing_serialiser_leaves_the_old_file(tmp_path, monkeypatch):
    p = write_json(tmp_path / "r.json", {"old": True})
    before = p.read_text()

    def half_then_fail(obj, fh, **kw):
        fh.write('{"half": ')
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(outputs.json, "dump", half_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_json(p, {"new": True}, overwrite=True)
    assert p.read_text() == before
    assert os.listdir(tmp_path) == ["r.json"]
    # a target that did not exist stays absent
    with pytest.raises(RuntimeError):
        write_json(tmp_path / "fresh.json", {"new": True})
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_failed_rename_leaves_the_old_file(tmp_path, monkeypatch):
    p = write_text(tmp_path / "r.md", "old\n")

    def no_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(outputs.os, "replace", no_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_text(p, "new\n", overwrite=True)
    assert p.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["r.md"]


def test_atomic_open_binary_and_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    with atomic_open(tmp_path / "b.bin", "wb") as fh:
        fh.write(b"\x89PNG")
        assert not (tmp_path / "b.bin").exists()  # nothing at the target until the block ends
    assert (tmp_path / "b.bin").read_bytes() == b"\x89PNG"
    assert synced  # the data was fsynced before the rename
    with pytest.raises(MoekitError, match="mode"), atomic_open(tmp_path / "c", "a"):
        pass


def test_figures_and_tensors_go_through_the_same_writer(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from safetensors.torch import load_file

    fig, ax = plt.subplots()
    ax.plot([1, 2])
    png = save_figure(fig, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    fig, _ = plt.subplots()
    with pytest.raises(MoekitError, match="already exists"):
        save_figure(fig, png)
    t = save_tensors({"x": torch.arange(3)}, tmp_path / "s.safetensors", {"k": "v"})
    assert load_file(str(t))["x"].tolist() == [0, 1, 2]
    with pytest.raises(MoekitError, match="already exists"):
        save_tensors({"x": torch.zeros(1)}, t)
    assert sorted(os.listdir(tmp_path)) == ["p.png", "s.safetensors"]


def test_no_module_writes_a_file_by_itself():
    """Every output goes through moekit/outputs.py: no other module of the package opens a file for writing,
    renames one into place, or calls a library's own file writer. The scripts run inside the client
    environments (vLLM, llm-compressor) are exempt: they write their answer into a temporary folder moekit made.
    A line may say why it is not one of these writes: ``# writes inside a staged_dir`` (the folder is renamed into
    place whole) or ``# not an output`` (a lock file, a request to a worker in a private temporary folder)."""
    import re
    from pathlib import Path

    import moekit

    root = Path(moekit.__file__).parent
    exempt = {"outputs.py", "vllm_worker.py", "llmc_worker.py", "vllm_entry.py"}
    pattern = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*[\"'][wa]b?[\"']|\.savefig\(|save_file\(|"
                         r"os\.replace\(|\.rename\(|mkstemp\(|mkdtemp\(")
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name in exempt:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and not any(m in line for m in ("# writes inside a staged_dir", "# not an output")):
                found.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
