"""Atomic checkpoint writes, safe loading and RNG round trips."""
import random

import numpy as np
import pytest
import torch

from mdeq.engine.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_atomic


def test_save_is_atomic_and_loads_with_weights_only(tmp_path):
    path = tmp_path / "ck" / "last.pth"
    save_atomic({"a": torch.arange(3), "cfg": {"lr": 0.1, "name": "x"}}, path)
    first = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"bad": Unpicklable()}, path)
    assert path.read_bytes() == first  # the old checkpoint survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]  # no temp file left
    ck = load_checkpoint(path)
    assert torch.equal(ck["a"], torch.arange(3)) and ck["cfg"] == {"lr": 0.1, "name": "x"}


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "torn.pth").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "torn.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    save_atomic({"rng": capture_rng_state()}, tmp_path / "r.pth")
    expected = (torch.rand(4), random.random(), np.random.randn(3))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    restore_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    got = (torch.rand(4), random.random(), np.random.randn(3))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])
