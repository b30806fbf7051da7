"""Fixtures shared by several test files: one thread, a full disk, the state of a folder, a checkpoint in
train.py's layout, files in the released OpenMixup layouts, the probe of OpenMP's settings at torch's import.
Test files share nothing else: none imports another."""

import ast
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
from a2mim import A2MIM
from models import arch_family, build_encoder


@pytest.fixture(autouse=True, scope="session")
def one_thread_from_the_start():
    """Every test on one CPU thread, module-scoped fixtures included (they run before function-scoped ones):
    a run compared with another must use the same thread count, or float sums differ. These models are tiny:
    on a 2-core machine shared with other jobs, a second OpenMP thread makes them many times slower."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread(one_thread_from_the_start):
    """Back to one thread after each test (a script's --threads sets it for the whole process)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


class HalfWrite:
    """A file whose first write puts half its bytes on disk, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def fill_disk(monkeypatch):
    """fill_disk(): from then on, every file runtime.py writes (atomic_save, append_line) hits a full disk half-way."""

    def half_writing_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return HalfWrite(f) if "w" in mode or "a" in mode else f

    def fill():
        # shadows the builtin in runtime only
        monkeypatch.setattr(runtime, "open", half_writing_open, raising=False)

    return fill


@pytest.fixture
def fill_disk_for_pngs(monkeypatch):
    """fill_disk_for_pngs(): from then on, a PNG's write fails as a full disk does (other files are written)."""
    real_fsync = os.fsync

    def fsync(fd):
        if ".png" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def fill():
        monkeypatch.setattr(runtime.os, "fsync", fsync)

    return fill


@pytest.fixture
def folder_state():
    """folder_state(path): every file under `path` with its bytes, every sub-folder as None: what a refused
    command must leave exactly as it was."""

    def state(path):
        return {
            str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
            for p in sorted(Path(path).rglob("*"))
        }

    return state


@pytest.fixture
def train_checkpoint():
    """train_checkpoint(path, arch, img_size, width, data_name) → the encoder of an untrained A2MIM saved
    at `path` as a train.py checkpoint (runtime.Checkpoint), built in-process in a second."""

    def write(path, arch="resnet18", img_size=32, width=8, data_name="fake"):
        kw = dict(arch=arch, img_size=img_size)
        if arch_family(arch) == "cnn":
            kw["width"] = width
        torch.manual_seed(1)
        model = A2MIM(build_encoder(**kw))  # the default mask block of this size and token site
        config = dict(data=data_name, method="a2mim")
        runtime.save_checkpoint(
            path, runtime.Checkpoint(model=model.state_dict(), encoder_kwargs=kw, config=config)
        )
        return model.encoder

    return write


class Released:
    """Files in the released OpenMixup layouts, made from openmixup_keys.json: the key names and shapes of
    the models built from the released configs (facts; no network, no OpenMixup code)."""

    facts = json.loads((Path(__file__).parent / "openmixup_keys.json").read_text())
    archs = [a for a in facts if not a.startswith("_")]  # the 10 released A²MIM encoders

    @staticmethod
    def expand(rows):
        """The fixture's compact rows → one row per key: consecutive rows that share "prefix{a..b}." stand
        for blocks a..b of that prefix, block after block (e.g. "layer3.{1..22}.conv1.weight")."""
        full, i = [], 0
        while i < len(rows):
            m = re.search(r"\{(\d+)\.\.(\d+)\}", rows[i][0])
            if not m:
                full.append(rows[i])
                i += 1
                continue
            head, group = rows[i][0][: m.end()], []
            while i < len(rows) and rows[i][0].startswith(head):
                group.append(rows[i])
                i += 1
            for b in range(int(m[1]), int(m[2]) + 1):
                full += [[r[0][: m.start()] + str(b) + r[0][m.end() :]] + r[1:] for r in group]
        return full

    @classmethod
    def keys(cls, arch, part="backbone"):
        """{key: (shape, dtype)} of a released model's backbone or neck, in the released order."""
        rows = cls.expand(cls.facts[arch][part])
        return {
            r[0]: (tuple(r[1]), getattr(torch, r[2]) if len(r) > 2 else torch.float32) for r in rows
        }

    @staticmethod
    def save(path, backbone, neck, layout, head=None):
        """The two published layouts: "full" = the mmcv runner checkpoint publish_model.py writes (meta +
        prefixed state dict, torch's legacy serialization; `head`: a fine-tuned file's classifier);
        "backbone" = extract_backbone_weights.py's (zip)."""
        if layout == "full":
            state = {f"backbone.{k}": v for k, v in backbone.items()}
            state |= {f"neck.{k}": v for k, v in neck.items()}
            state |= {f"head.{k}": v for k, v in (head or {}).items()}
            meta = dict(
                openmixup_version="0.2.9",
                config="model = dict(type='A2MIM')",
                seed=0,
                epoch=300,
                iter=375300,
                hook_msgs=dict(last_ckpt="work_dirs/epoch_300.pth"),
                mmcv_version="1.7.2",
                time="Thu Jan  1",
            )
            torch.save(
                dict(meta=meta, state_dict=state), path, _use_new_zipfile_serialization=False
            )
        else:
            torch.save(dict(state_dict=backbone, author="openmixup"), path)
        return path

    @staticmethod
    def perturb_(module):
        """Every parameter and buffer away from its init (no zero or one hiding a wrong place), BN
        variances > 0."""
        with torch.no_grad():
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape) + 0.5)
                elif t.is_floating_point():
                    t.add_(torch.randn(t.shape) * (0.02 if t.ndim > 1 else 0.2))

    @classmethod
    def resnet50(cls, tmp_path, layout="full", head=None):
        """A released-layout ResNet-50 with perturbed values (every BN statistic too), built from our
        encoder: the ResNet key map is the identity, so its keys must be the fixture's.
        Returns (path, our encoder)."""
        torch.manual_seed(0)
        encoder = build_encoder("resnet50", 224).eval()
        cls.perturb_(encoder)
        token = dict(mask_token=torch.randn(1, 1024, 1, 1), mask_gamma=torch.rand(1, 1024, 1, 1))
        backbone = dict(encoder.state_dict()) | token
        shapes = {k: s for k, (s, _) in cls.keys("resnet50").items()}
        assert {k: tuple(v.shape) for k, v in backbone.items()} == shapes
        neck = {
            "decoder_pred.0.weight": torch.randn(3072, 2048, 1, 1),
            "decoder_pred.0.bias": torch.randn(3072),
        }
        path = cls.save(tmp_path / f"r50_{layout}.pth", backbone, neck, layout, head)
        return path, encoder


@pytest.fixture
def released():
    """The Released helpers: released.resnet50(tmp_path), released.keys(arch), released.save(...), ..."""
    return Released


# A script's import, watched: the OpenMP settings in the environment at the moment torch is imported.
OPENMP_WAIT_AT_TORCH_IMPORT = """
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not hasattr(Spy, "seen"):
            Spy.seen = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
sys.meta_path.insert(0, Spy())
import SCRIPT
print(Spy.seen)
"""


@pytest.fixture
def openmp_probe():
    """openmp_probe(script, user_env) → {OMP_WAIT_POLICY, GOMP_SPINCOUNT} as a fresh process importing
    `script` had them when torch was first imported (libgomp reads them then, once); the environment is
    this one without those two, plus `user_env`."""

    def seen(script, user_env):
        chosen = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        env = {k: v for k, v in os.environ.items() if k not in chosen} | user_env
        code = OPENMP_WAIT_AT_TORCH_IMPORT.replace("SCRIPT", script)
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return ast.literal_eval(out.splitlines()[-1])

    return seen
