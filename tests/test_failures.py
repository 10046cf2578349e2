"""A rank's real error under DDP ends the output: the mechanism, without starting processes."""

from __future__ import annotations

import atexit
import os

import pytest

from atm_lightning import cli, failures


@pytest.fixture
def at_exit(monkeypatch) -> list:
    """What the code registers with atexit, run by the test instead of at interpreter exit."""
    registered: list = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: registered.append((fn, args)))
    monkeypatch.delenv(failures.FOLDER_ENV, raising=False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    return registered


def test_first_process_ends_with_every_rank_failure_first_one_first(monkeypatch, capsys, at_exit) -> None:
    def two_ranks_fail(args):
        # What Lightning's launcher does before starting rank 1 with a copy of this environment.
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
        with monkeypatch.context() as rank1:  # rank 1's own `atm` process, in short
            rank1.setenv("LOCAL_RANK", "1")
            with pytest.raises(ValueError), failures.failure_summary():
                raise ValueError("cannot read image /data/val/x.JPEG (truncated)\nsecond line")
        raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(cli, "ATMCLI", two_ranks_fail)
    with pytest.raises(RuntimeError, match="Connection closed"):
        cli.main(["validate"])
    assert failures.FOLDER_ENV not in os.environ
    ((report, args),) = at_exit  # printed after rank 0's own traceback
    report(*args)
    assert capsys.readouterr().err.splitlines() == [
        "rank 1 failed first: ValueError: cannot read image /data/val/x.JPEG (truncated)",
        "rank 0 failed: RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:29500",
    ]
    assert not args[0].exists()


def test_a_single_process_adds_nothing(monkeypatch, capsys, at_exit) -> None:
    def fail(args):
        raise ValueError("bad")

    monkeypatch.setattr(cli, "ATMCLI", fail)
    with pytest.raises(ValueError, match="bad"):
        cli.main(["validate"])
    assert at_exit == [] and capsys.readouterr().err == ""
    assert failures.FOLDER_ENV not in os.environ


def test_rank_labels(monkeypatch, at_exit) -> None:
    assert failures.rank_label() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert failures.rank_label() == "1"
    monkeypatch.setenv("NODE_RANK", "1")
    assert failures.rank_label() == "1 of node 1"
    monkeypatch.setenv("RANK", "3")
    assert failures.rank_label() == "3"
