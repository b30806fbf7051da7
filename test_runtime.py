"""runtime.py's file helpers: appends that fail leave the file as it was, JSONL readers that name a bad
line, atomic writes that leave no .tmp, and the refused-pickle sentence whatever torch's wording."""

import errno
import os

import pytest
import torch

import runtime


def test_a_failed_append_leaves_the_file_byte_identical_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    runtime.append_line(str(path), '{"a": 1}')
    before = path.read_bytes()
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.os, "fsync", full_disk)
    with pytest.raises(
        runtime.RunError, match="no space left on the device while writing .*results.jsonl"
    ):
        runtime.append_line(str(path), '{"a": 2}')
    monkeypatch.setattr(runtime.os, "fsync", real_fsync)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["results.jsonl"]
    runtime.append_line(str(path), '{"a": 3}')
    assert runtime.read_jsonl(str(path)) == [{"a": 1}, {"a": 3}]


def test_an_append_after_a_torn_last_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": ')
    runtime.append_line(str(path), '{"a": 2}')
    assert path.read_text().splitlines() == ['{"a": 1}', '{"a": ', '{"a": 2}']
    with pytest.raises(runtime.JsonlError, match=r"log.jsonl, line 2, is not a JSON record"):
        runtime.read_jsonl(str(path))


def test_read_jsonl_drops_only_a_torn_last_line_and_says_so(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert runtime.read_jsonl(str(path), drop_torn_last=True) == [{"step": 1}, {"step": 2}]
    assert "dropped the damaged last line 3" in capsys.readouterr().err
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(runtime.JsonlError, match="line 2"):
        runtime.read_jsonl(
            str(path), drop_torn_last=True
        )  # not the last line: a damaged file, not a kill
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(runtime.JsonlError, match="line 2"):
        runtime.read_jsonl(str(path))  # JSON, but not a record


def test_writes_to_a_folder_are_refused_and_the_folder_is_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for write in (runtime.append_line, runtime.atomic_save):
        with pytest.raises(runtime.RunError, match="is not a regular file"):
            write(str(target), "text")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "keep.txt").read_text() == "mine"


def test_a_failed_rename_onto_a_protected_file_leaves_it_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    runtime.atomic_save(str(path), {"w": torch.ones(2)})
    before = path.read_bytes()

    def immutable(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(runtime.os, "replace", immutable)
    with pytest.raises(
        runtime.RunError,
        match="Operation not permitted while writing .*the previous checkpoint.pt is intact",
    ):
        runtime.atomic_save(str(path), {"w": torch.zeros(2)})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo ran",))


def test_a_pickle_that_would_run_code_gets_the_promised_sentence_and_garbage_another(tmp_path):
    evil, garbage = tmp_path / "evil.pt", tmp_path / "garbage.pt"
    torch.save({"x": _Payload()}, evil)
    garbage.write_bytes(b"\x80\x02not a pickle at all" * 8)
    with pytest.raises(runtime.CheckpointError) as refused:
        runtime.load_tensors(str(evil))
    assert str(refused.value) == (
        f"{evil} was refused: it holds Python objects, not only tensors, and loading it could run code from "
        "the file; if you trust it, look inside with `python -m pickletools` or re-save its tensors with "
        "torch.save(state_dict)"
    )
    with pytest.raises(runtime.CheckpointError, match="is not a readable PyTorch checkpoint"):
        runtime.load_tensors(str(garbage))
    with pytest.raises(runtime.CheckpointError, match="is a folder, not a file"):
        runtime.load_tensors(str(tmp_path))
