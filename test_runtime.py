"""runtime.py, what every script shares: the errors and the entry point, the settings mechanism (Setting,
Range), the one checkpoint layout, the file helpers (appends that fail leave the file as it was, JSONL
readers that name a bad line, atomic writes that leave no .tmp, the refused-pickle sentence whatever
torch's wording), and the project's import graph (no cycle)."""

import argparse
import ast
import errno
import math
import os
from pathlib import Path

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
        # not the last line: a damaged file, not a kill
        runtime.read_jsonl(str(path), drop_torn_last=True)
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


# ------------------------------------------------------------------------------------------
# Errors and the entry point.


def test_every_project_error_is_a_user_error_that_main_turns_into_one_sentence_and_exit_2(capsys):
    errors = (runtime.ConfigError, runtime.DataError, runtime.CheckpointError, runtime.RunError)
    for error in (*errors, runtime.JsonlError):
        assert issubclass(error, runtime.UserError)

        @runtime.entry_point
        def main(argv=None, error=error):
            raise error(f"--x must be 1, got {argv}")

        assert main(["2"]) == 2
        assert capsys.readouterr().err == "error: --x must be 1, got ['2']\n"


def test_a_bug_under_the_entry_point_keeps_its_traceback():
    @runtime.entry_point
    def main(argv=None):
        return {}["missing"]

    with pytest.raises(KeyError):
        main([])


# ------------------------------------------------------------------------------------------
# Settings: one mechanism for train.py, eval_linear.py and bench.py.


def test_a_range_says_what_it_holds_and_refuses_nan_inf_and_its_open_ends():
    assert str(runtime.AT_LEAST_1) == "at least 1" and str(runtime.POSITIVE) == "greater than 0"
    assert str(runtime.FRACTION) == "in [0, 1)" and str(runtime.SEED) == "in [0, 4294967295]"
    assert str(runtime.Range(0, 1, lo_open=True)) == "in (0, 1]"
    assert 0 in runtime.FRACTION and 1 not in runtime.FRACTION and 0 not in runtime.POSITIVE
    for value in (math.nan, math.inf, -math.inf):
        assert value not in runtime.AT_LEAST_0
    with pytest.raises(runtime.ConfigError, match=r"^--mask-ratio must be in \[0, 1\), got 1$"):
        runtime.FRACTION.check("--mask-ratio", 1)
    with pytest.raises(
        runtime.ConfigError, match="^--blr must be a finite number greater than 0, got nan$"
    ):
        runtime.POSITIVE.check("--blr", math.nan)


def test_settings_make_the_parser_whose_values_default_to_none_and_are_checked_in_order():
    settings = [
        runtime.Setting(name="mask_ratio", default=0.6, help="r", range=runtime.FRACTION),
        runtime.Setting(name="sync_bn", default=True, help="s"),
        runtime.Setting(name="milestones", help="m", type=int, nargs="+", range=runtime.POSITIVE),
        runtime.Setting(name="schedule", default="cosine", help="c", choices=("cosine", "step")),
    ]
    parser = argparse.ArgumentParser()
    runtime.add_settings(parser, settings)
    text = " ".join(parser.format_help().split())
    assert "--mask-ratio MASK_RATIO r (default: 0.6; valid: in [0, 1))" in text
    assert "--schedule {cosine,step} c (default: cosine)" in text
    given = parser.parse_args(["--no-sync-bn", "--milestones", "60", "80"])
    assert runtime.command_line(given, settings) == dict(sync_bn=False, milestones=[60, 80])
    # nothing given: nothing wins
    assert runtime.command_line(parser.parse_args([]), settings) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule", "linear"])
    runtime.check_settings(settings, dict(mask_ratio=0.6, milestones=[60, 80]))
    with pytest.raises(runtime.ConfigError, match="^--milestones must be greater than 0, got 0$"):
        runtime.check_settings(settings, dict(mask_ratio=0.6, milestones=[60, 0]))
    table = runtime.config_table(dict(mask_ratio=0.6), dict(mask_ratio="command line"))
    assert table[0].split() == ["mask_ratio", "0.6", "command", "line"]


def test_only_imagenet_or_the_official_preset_takes_the_papers_recipe():
    assert runtime.takes_paper_recipe("auto", "imagenet") and runtime.takes_paper_recipe(
        "official", "folder"
    )
    for data_name in ("folder", "fashion-mnist", "cifar10", "stl10"):
        assert not runtime.takes_paper_recipe("auto", data_name)
    assert not runtime.takes_paper_recipe("small", "imagenet")


# ------------------------------------------------------------------------------------------
# The checkpoint layout: one writer, one reader.


def test_a_checkpoint_reads_back_as_written_and_anything_else_is_refused_in_one_sentence(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    kw = dict(arch="resnet18", img_size=32, width=8)
    ckpt = runtime.Checkpoint(
        model={"w": torch.ones(2)},
        config=dict(seed=0),
        encoder_kwargs=kw,
        step=3,
        epoch=1,
        images=60,
    )
    runtime.save_checkpoint(path, ckpt)
    back = runtime.load_checkpoint(path, arch="resnet18")
    assert back.step == 3 and back.epoch == 1 and back.images == 60 and back.arch == "resnet18"
    assert torch.equal(back.model["w"], torch.ones(2)) and back.config == dict(seed=0)
    assert torch.load(path, weights_only=True)["format"] == runtime.CHECKPOINT_FORMAT
    with pytest.raises(
        runtime.CheckpointError, match="holds a resnet18 model, but --arch is vit_tiny"
    ):
        runtime.load_checkpoint(path, arch="vit_tiny")
    torch.save(dict(model={}, config={}), tmp_path / "plain.pt")  # no marker
    with pytest.raises(
        runtime.CheckpointError, match="is not an A²MIM checkpoint written by train.py"
    ):
        runtime.load_checkpoint(str(tmp_path / "plain.pt"))
    # marker, no model
    torch.save(dict(format=runtime.CHECKPOINT_FORMAT, config={}), tmp_path / "cut.pt")
    with pytest.raises(runtime.CheckpointError, match="is not an A²MIM checkpoint"):
        runtime.load_checkpoint(str(tmp_path / "cut.pt"))


def test_a_checkpoint_with_keys_a_later_version_added_still_loads(tmp_path):
    state = dict(
        format=runtime.CHECKPOINT_FORMAT, model={}, config={}, encoder_kwargs=dict(arch="vit_tiny")
    )
    torch.save(state | dict(ema={"w": torch.zeros(1)}), tmp_path / "newer.pt")
    assert runtime.load_checkpoint(str(tmp_path / "newer.pt")).arch == "vit_tiny"


# ------------------------------------------------------------------------------------------
# The import graph.


def project_imports():
    """{module: the project modules it imports} for every non-test .py file next to this one."""
    here = Path(__file__).parent
    ours = {
        p.stem for p in here.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest"
    }
    graph = {}
    for name in sorted(ours):
        tree = ast.parse((here / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[name] = found & ours
    return graph


def test_the_project_import_graph_has_no_cycle_and_runtime_imports_no_project_file():
    graph = project_imports()
    assert graph["runtime"] == set()
    done, active = set(), []

    def visit(name):
        assert name not in active, f"import cycle: {' -> '.join([*active, name])}"
        if name in done:
            return
        active.append(name)
        for other in sorted(graph[name]):
            visit(other)
        active.pop()
        done.add(name)

    for name in graph:
        visit(name)
