import json
import os
import stat

import pytest
from conftest import snapshot

from monai_medmerge.io import atomic_write, output_folder, write_bytes, write_json, write_text


def test_write_replaces_whole_file_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    write_text(target, "new\n")
    assert target.read_text() == "new\n"
    write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with pytest.raises(TypeError):
        write_json(target, {"x": object()})
    assert target.read_bytes() == b"old"


def test_refuses_a_folder_and_a_non_writing_mode(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        write_text(tmp_path, "x")
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "f", "a"):
            pass


# --- atomic_folder ---------------------------------------------------------------------------------------------------
def _fill(folder, text="new"):
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text(text)
    (folder / "b.bin").write_bytes(b"\x01")


def _user_tree(root):
    """A parent folder as a user might have it: the target, and siblings whose names look like temporary ones."""
    (root / "out").mkdir(parents=True)
    (root / "out" / "old.txt").write_text("old")
    for name in (".out.old", ".out.tmp", ".out.medmerge-tmp", ".out.abc.medmerge-old", "out.old"):
        (root / name).mkdir()
        (root / name / "keep.txt").write_text(name)
    (root / "notes.txt").write_text("mine")


def test_atomic_folder_creates_with_umask_permissions(tmp_path):
    from monai_medmerge.io import atomic_folder

    old_umask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "deep" / "bundle") as tmp:
            assert tmp.parent == tmp_path / "deep" and tmp.name.startswith(".bundle.")
            _fill(tmp)
    finally:
        os.umask(old_umask)
    target = tmp_path / "deep" / "bundle"
    assert snapshot(target) == {
        ".": ("dir", 0o755, 0, ""),
        "b.bin": ("file", 0o644, 1, snapshot(target)["b.bin"][3]),
        "sub": ("dir", 0o755, 0, ""),
        "sub/a.txt": ("file", 0o644, 3, snapshot(target)["sub/a.txt"][3]),
    }
    assert sorted(os.listdir(tmp_path / "deep")) == ["bundle"]


def test_atomic_folder_overwrite_replaces_exactly_the_named_folder(tmp_path):
    from monai_medmerge.io import atomic_folder

    _user_tree(tmp_path)
    before = snapshot(tmp_path)
    with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
        _fill(tmp)
    after = snapshot(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"out/old.txt", "out/sub", "out/sub/a.txt", "out/b.bin"} | ({"out"} & changed)
    assert (tmp_path / "out" / "sub" / "a.txt").read_text() == "new"
    assert not (tmp_path / "out" / "old.txt").exists()


def test_atomic_folder_refusals_change_nothing(tmp_path, monkeypatch):
    from monai_medmerge.io import atomic_folder

    _user_tree(tmp_path)
    (tmp_path / "file.pt").write_bytes(b"weights")
    (tmp_path / "out" / "model.pt").write_bytes(b"input")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)

    def attempt(target, error, match, **kwargs):
        with pytest.raises(error, match=match):
            with atomic_folder(target, **kwargs) as tmp:
                _fill(tmp)
        assert snapshot(tmp_path) == before

    out = tmp_path / "out"
    attempt(out, FileExistsError, f"^folder {out} exists; pass overwrite=True")
    attempt(tmp_path / "file.pt", NotADirectoryError, f"^folder {tmp_path / 'file.pt'} is a file, not a folder")
    attempt(tmp_path / "file.pt", NotADirectoryError, "is a file", overwrite=True)
    attempt(tmp_path / "file.pt" / "b", NotADirectoryError, f"{tmp_path / 'file.pt'} is a file, not a folder")
    attempt(tmp_path / "link", NotADirectoryError, "is a symbolic link", overwrite=True)
    checkpoint = out / "model.pt"
    refused = f"^bundle folder {out} contains the checkpoint {checkpoint}: writing it would remove its own input"
    kwargs = {"overwrite": True, "what": "bundle folder"}
    attempt(out, ValueError, refused, inputs={"checkpoint": checkpoint, "config": None}, **kwargs)
    attempt(out, ValueError, f"^bundle folder {out} is the source {out}", inputs={"source": out}, **kwargs)
    attempt(tmp_path / "new", ValueError, "is the input", inputs=[tmp_path / "new"])
    monkeypatch.chdir(out)
    attempt(out, ValueError, f"folder {out} is the current folder", overwrite=True)
    attempt(tmp_path, ValueError, f"folder {tmp_path} contains the current folder", overwrite=True)


def test_atomic_folder_failure_keeps_the_old_folder(tmp_path, monkeypatch):
    from monai_medmerge.io import atomic_folder

    _user_tree(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            _fill(tmp)
            raise RuntimeError("boom")
    assert snapshot(tmp_path) == before
    # the new folder cannot be renamed into place: the old one is put back
    real_rename = os.rename
    calls = []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="No space left"):
        with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            _fill(tmp)
    monkeypatch.undo()
    assert len(calls) == 3 and snapshot(tmp_path) == before


def test_atomic_folder_unwritable_parent_names_the_target(tmp_path, monkeypatch):
    from monai_medmerge.io import atomic_folder

    target = tmp_path / "ro" / "bundle"
    (tmp_path / "ro").mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / ".bundle.x"))

    monkeypatch.setattr("tempfile.mkdtemp", denied)
    with pytest.raises(PermissionError, match=f"^cannot write bundle folder {target}: Permission denied"):
        with atomic_folder(target, what="bundle folder"):
            pass
    monkeypatch.undo()
    if os.geteuid() == 0:
        return  # root writes anywhere: the real permission check below needs an ordinary user
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"^cannot write folder {target}: Permission denied"):
            with atomic_folder(target):
                pass
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert os.listdir(tmp_path / "ro") == []


def test_atomic_write_permissions_and_tmp_dir(tmp_path):
    side = tmp_path / "partial"
    side.mkdir()
    target = tmp_path / "series" / "x.dcm"
    with atomic_write(target, permissions=0o600, tmp_dir=side) as f:
        assert len(os.listdir(side)) == 1 and os.listdir(target.parent) == []  # the series folder stays clean
        f.write(b"dicom")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_bytes() == b"dicom"
    assert os.listdir(side) == [] and os.listdir(target.parent) == ["x.dcm"]
    write_json(tmp_path / "m.json", {"a": 1}, permissions=0o600)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o600


def test_output_folder_names_the_file_in_its_way(tmp_path):
    made = output_folder(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b" and made.is_dir()
    assert output_folder(made) == made  # an existing folder is written into, as before
    (tmp_path / "f").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(NotADirectoryError, match=r"the output folder .*f is a file, not a folder: give another path"):
        output_folder(tmp_path / "f")
    with pytest.raises(
        NotADirectoryError, match=r"cannot make the results folder .*f/x/y: .*f is a file, not a folder"
    ):
        output_folder(tmp_path / "f" / "x" / "y", what="results folder")
    assert snapshot(tmp_path) == before


def test_demo_into_a_file_is_one_line_before_any_work(tmp_path, capsys):
    from monai_medmerge.cli import main

    (tmp_path / "taken").write_text("keep")
    assert main(["demo", "--out", str(tmp_path / "taken"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"medmerge: error: the output folder {tmp_path / 'taken'} is a file, not a folder: give another path"
    )
    assert (tmp_path / "taken").read_text() == "keep"
