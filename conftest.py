"""Fixtures shared by several test files."""
import errno

import pytest
import torch

import runtime


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one CPU thread, the count put back afterwards (a script's --threads sets it for the
    whole process). These models are tiny: on a 2-core machine shared with other jobs, OpenMP's second
    thread makes them many times slower, not faster (README, CPU notes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
