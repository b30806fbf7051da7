"""Fixtures shared by several test files."""
import errno
import os

import pytest
import torch

import runtime


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
        monkeypatch.setattr(runtime, "open", half_writing_open, raising=False)  # shadows the builtin in runtime only
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
