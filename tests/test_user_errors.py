"""A user's mistake ends as one `error:` line and exit status 1; --debug or ATM_DEBUG=1 shows the
traceback; a bug keeps its traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from unittest import mock

import pytest
from torch._utils import ExceptionWrapper

from atm_lightning.cli import main
from atm_lightning.data import ImageNetDataModule
from atm_lightning.data.images import open_rgb
from atm_lightning.user_errors import user_message
from tests.helpers import CONFIGS


@pytest.fixture
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATM_DEBUG")


def validate(root: Path, *extra: str) -> list[str]:
    return [
        "validate", "--config", str(CONFIGS / "vit_t_dense.yaml"), "--model.pretrained", "false",
        "--model.num_classes", "3", "--data.root", str(root), "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


def run_console(argv: list[str]) -> None:
    """``atm ARGV`` as the console script runs it (arguments from sys.argv)."""
    with mock.patch("sys.argv", ["atm", *argv]):
        main()


def test_a_mistake_is_one_line_and_exit_1(no_debug, tmp_path, monkeypatch, capsys, data_root) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_console(validate(data_root, "--data.crop_pct", "2"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: --data.crop_pct is the share of the resized image kept by the centre crop, in (0, 1]")
    assert err.strip().endswith(line)


def test_debug_shows_the_traceback(no_debug, tmp_path, monkeypatch, data_root) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--data.crop_pct"):
        run_console(validate(data_root, "--data.crop_pct", "2", "--debug"))
    monkeypatch.setenv("ATM_DEBUG", "1")
    with pytest.raises(ValueError, match=r"--data.crop_pct"):
        run_console(validate(data_root, "--data.crop_pct", "0"))


def test_a_bug_keeps_its_traceback(no_debug, tmp_path, monkeypatch, data_root) -> None:
    def broken_setup(self, stage=None):
        return int("not a number")  # a ValueError raised outside this package's code

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ImageNetDataModule, "setup", broken_setup)
    with pytest.raises(ValueError, match=r"invalid literal for int"):
        run_console(validate(data_root))


def test_a_tool_mistake_is_one_line_too(no_debug, tmp_path, capsys) -> None:
    existing = tmp_path / "bench.csv"
    existing.write_text("an earlier result\n")
    argv = ["benchmark", "--random-init", "--data-root", str(tmp_path), "--output", str(existing)]
    with pytest.raises(SystemExit) as exit_info:
        run_console(argv)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: {existing} already exists; pass --overwrite to replace it, or choose another --output\n"
    assert existing.read_text() == "an earlier result\n"


def test_a_data_loader_workers_error_is_read_from_its_message(tmp_path) -> None:
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"not a JPEG")
    try:
        open_rgb(bad)
    except ValueError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ValueError) as raised:
        wrapper.reraise()
    assert user_message(raised.value).startswith(f"cannot read image {bad} (cannot identify image file")
    assert user_message(ValueError("raised here, in a test")) is None  # not this package's code


def test_lightnings_adverts_are_not_printed(tmp_path, monkeypatch, capsys, caplog, data_root) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        main(validate(data_root, "--data.limit", "3", "--trainer.logger", "false"))
    printed = capsys.readouterr()
    assert "GPU available" in caplog.text + printed.err  # Lightning's other messages stay
    for text in (caplog.text, printed.out, printed.err):
        assert "litlogger" not in text and "litmodels" not in text
