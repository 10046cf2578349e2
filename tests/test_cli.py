"""The real `atm` entry point, in-process on a tiny generated ImageFolder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from atm_lightning import ATM, NoMerge, ToMe, patch
from atm_lightning.patch.compiled import compiled_block
from atm_lightning.cli import ATMCLI, main, run_name
from atm_lightning.data import ImageNetDataModule
from atm_lightning.threads import available_cpus, default_threads
from atm_lightning.merge.fused import missing_build_tool
from tests.helpers import CONFIGS

NAME = "vit_tiny_patch16_224"
ROW_KEYS = {
    "stage",
    "model",
    "weights",
    "method",
    "merger",
    "batch_size",
    "world_size",
    "img_size",
    "crop_pct",
    "interpolation",
    "hflip",
    "num_images",
    "top1",
    "top5",
    "loss",
    "gflops",
    "gflops_dense",
    "gflops_matching",
    "flops_reduction",
    "rerun_fraction",
    "top1_dense",
    "top1_change",
    "top1_change_ci95",
    "lossless",
    "agreement",
    "kl",
    "tokens_per_layer",
    "img_per_s",
    "threads",
    "num_workers",
    "merge_step",
}


@pytest.fixture(scope="module")
def weights(vit_weights) -> Path:
    return vit_weights(3)


def run(*args: str) -> None:
    with mock.patch("sys.argv", ["atm"]):
        main(list(args))


def eval_args(config: str, weights: Path, root: Path, *extra: str) -> list[str]:
    return [
        "validate",
        "--config",
        str(CONFIGS / config),
        "--model.weights",
        str(weights),
        "--model.num_classes",
        "3",
        "--data.root",
        str(root),
        "--data.batch_size",
        "3",
        "--data.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def metrics(run_dir: Path) -> dict:
    (path,) = run_dir.glob("runs/*/version_*/metrics.json")
    return json.loads(path.read_text())


def predict(weights: Path, root: Path, merger) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels computed by hand: timm model, the same weights and preprocessing, batch 3."""
    model = timm.create_model(NAME, num_classes=3)
    model.load_state_dict(load_file(str(weights)))
    patch(model.eval(), merger)
    dm = ImageNetDataModule(
        str(root), model_name=NAME, num_classes=3, batch_size=3, num_workers=0, crop_pct=0.9
    )
    dm.setup("validate")
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in dm.val_dataloader()]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def reference(weights: Path, root: Path, merger) -> dict:
    """top-1, loss and fidelity to the unmerged model, computed independently of the module."""
    logits, targets = predict(weights, root, merger)
    dense, _ = predict(weights, root, NoMerge())
    kl = F.kl_div(logits.double().log_softmax(1), dense.double().log_softmax(1), log_target=True, reduction="sum")
    return {
        "top1": 100 * (logits.argmax(1) == targets).double().mean().item(),
        "top1_dense": 100 * (dense.argmax(1) == targets).double().mean().item(),
        "loss": F.cross_entropy(logits.double(), targets).item(),
        "agreement": 100 * (logits.argmax(1) == dense.argmax(1)).double().mean().item(),
        "kl": kl.item() / len(targets),
    }


@pytest.mark.parametrize(
    ("config", "merger"),
    [
        ("vit_t_dense.yaml", NoMerge()),
        ("vit_t_tome.yaml", ToMe(r=13)),
        ("vit_t_atm.yaml", None),  # the shipped operating point, read from the config
    ],
)
def test_validate_writes_exact_metrics(tmp_path, monkeypatch, data_root, weights, config, merger) -> None:
    if merger is None:
        merger = ATM(**yaml.safe_load((CONFIGS / config).read_text())["model"]["merger"]["init_args"])
    monkeypatch.chdir(tmp_path)
    run(*eval_args(config, weights, data_root))
    row = metrics(tmp_path)
    assert set(row) == ROW_KEYS
    assert row["num_images"] == 8 and row["world_size"] == 1 and row["batch_size"] == 3
    assert row["num_workers"] == 0 and row["threads"] == min(2, available_cpus())  # no workers: every core
    assert row["method"] == merger.name and row["crop_pct"] == 0.9 and row["weights"] == str(weights)
    # The default fused="auto": ATM's compiled step where it builds (the reference runs the eager one).
    fused = "fused" if missing_build_tool() is None else "batched"
    assert row["merge_step"] == {"NoMerge": "none", "ToMe": "batched", "ATM": fused}[type(merger).__name__]
    want = reference(weights, data_root, merger)
    assert row["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert row["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert row["top1_dense"] == pytest.approx(want["top1_dense"], abs=1e-9)
    assert row["top1_change"] == pytest.approx(want["top1"] - want["top1_dense"], abs=1e-9)
    assert row["agreement"] == pytest.approx(want["agreement"], abs=1e-9)
    assert row["kl"] == pytest.approx(want["kl"], rel=1e-5, abs=1e-9)
    low, high = row["top1_change_ci95"]
    assert low <= row["top1_change"] <= high
    assert row["lossless"] == (low <= 0 <= high)
    assert len(row["tokens_per_layer"]) == 13 and row["tokens_per_layer"][0] == 197
    if merger.merges:
        assert row["flops_reduction"] > 0.05
    else:
        assert row["flops_reduction"] == 0.0


def test_threads_option_is_set_and_recorded(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    try:
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--threads", "1", "--data.limit", "3"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    row = metrics(tmp_path)
    assert row["threads"] == 1 and row["num_workers"] == 0


def test_default_threads_leave_the_workers_their_cores(monkeypatch) -> None:
    monkeypatch.setattr("atm_lightning.threads.available_cpus", lambda: 8)
    assert default_threads(workers=0) == 8
    assert default_threads(workers=3) == 5
    assert default_threads(workers=1, devices=2) == 3
    assert default_threads(workers=8) == 1


def test_merger_from_the_shell(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    run(*eval_args("vit_t_dense.yaml", weights, data_root, "--model.merger", "ToMe", "--model.merger.r", "8"))
    row = metrics(tmp_path)
    assert row["method"] == "tome" and row["merger"]["r"] == 8
    assert row["tokens_per_layer"] == [197 - 8 * i for i in range(13)]


def test_merger_override_names_the_run_by_the_method(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)  # was logged as runs/vit_t_atm, the config's name
    run(*eval_args("vit_t_atm.yaml", weights, data_root, "--model.merger", "ToMe", "--model.merger.r", "8"))
    assert [p.parent.name for p in tmp_path.glob("runs/*/version_0")] == ["vit_t_tome"]
    assert metrics(tmp_path)["method"] == "tome"


@pytest.mark.parametrize(
    ("name", "method", "renamed"),
    [
        ("vit_t_atm", "tome", "vit_t_tome"),
        ("deit_t_tome_ft", "atm", "deit_t_atm_ft"),
        ("deit_s_dense", "evit", "deit_s_evit"),
        ("deit_t_evit", "dense", "deit_t_dense"),
        ("vit_t_atm", "atm", "vit_t_atm"),
        ("ToMe_r_4", "tome", "ToMe_r_4"),  # atm compare's row names
        ("lightning_logs", "tome", "lightning_logs"),  # no method named: left alone
        ("atm_vs_tome", "evit", "atm_vs_tome"),  # two: ambiguous, left alone
    ],
)
def test_run_name_replaces_the_one_method_word(name, method, renamed) -> None:
    assert run_name(name, method) == renamed


def test_failed_run_leaves_no_version_folder(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="check --data.root and the split name"):
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--data.val_split", "nope"))
    assert not (tmp_path / "runs").exists()  # Lightning had made runs/vit_t_dense/version_0
    run(*eval_args("vit_t_dense.yaml", weights, data_root))
    with pytest.raises(FileNotFoundError):
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--data.val_split", "nope"))
    run(*eval_args("vit_t_dense.yaml", weights, data_root))
    versions = sorted(p.name for p in (tmp_path / "runs" / "vit_t_dense").iterdir())
    assert versions == ["version_0", "version_1"]
    assert all((tmp_path / "runs" / "vit_t_dense" / v / "metrics.json").is_file() for v in versions)


@pytest.mark.slow
def test_fit_checkpoint_evaluates_identically_through_weights(
    tmp_path, monkeypatch, data_root, weights
) -> None:
    monkeypatch.chdir(tmp_path)
    fit_args = eval_args(
        "vit_t_tome.yaml",
        weights,
        data_root,
        "--trainer.max_steps",
        "2",
        "--trainer.limit_train_batches",
        "2",
    )
    fit_args[0] = "fit"
    with mock.patch("sys.argv", ["atm"]):
        fitted = ATMCLI(args=fit_args)
    (ckpt,) = tmp_path.glob("runs/vit_t_tome/version_0/checkpoints/*.ckpt")
    fit_val = fitted.model.results["val"]
    assert fit_val["num_images"] == 8
    with mock.patch("sys.argv", ["atm"]):
        evaluated = ATMCLI(args=eval_args("vit_t_tome.yaml", ckpt, data_root))
    for name, tensor in fitted.model.model.state_dict().items():
        assert torch.equal(tensor, evaluated.model.model.state_dict()[name]), name
    row = metrics(tmp_path)
    assert row["top1"] == fit_val["top1"]
    assert row["loss"] == pytest.approx(fit_val["loss"], rel=1e-6)


def test_ckpt_path_with_validate_is_refused(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(*eval_args("vit_t_atm.yaml", weights, data_root, "--ckpt_path", str(weights)))
    assert exit_info.value.code != 0
    assert f"--model.weights {weights}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--model.model_name", "vit_tiny_patch16_22"], ValueError, r"did you mean vit_tiny_patch16_224"),
        (["--data.root", "/no/such/imagenet"], FileNotFoundError, r"/no/such/imagenet.*--data.root"),
        (
            ["--model.merger", "ToMe", "--model.merger.r", "-1"],
            ValueError,
            r"r must be a non-negative integer",
        ),
    ],
)
def test_errors_name_the_fix(tmp_path, monkeypatch, data_root, weights, extra, error, message) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        run(*eval_args("vit_t_dense.yaml", weights, data_root, *extra))


def test_weights_with_another_head_size_are_refused(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)  # was: exit 0, top-1 of a random head, metrics.json written
    with pytest.raises(ValueError, match=r"3-class classifier but --model.num_classes is 5; pass"):
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--model.num_classes", "5"))
    assert not list(tmp_path.glob("runs/*/*/metrics.json"))


def test_new_head_is_refused_outside_fit(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--model.new_head", "true"))
    assert "untrained classifier, so validate would report chance-level" in capsys.readouterr().err


def test_unknown_merger_lists_the_mergers(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--model.merger", "Foo"))
    assert exit_info.value.code == 2
    assert "--model.merger takes one of ATM, ToMe, EViT, NoMerge" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.strategy", "ddp_spawn"], "child processes.*use --trainer.strategy ddp"),
        (["--model.merger", "ToMe", "--model.merger.r", "[1, 2]x"], None),  # jsonargparse's own error
    ],
)
def test_parse_time_refusals(tmp_path, monkeypatch, capsys, data_root, weights, extra, message) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(*eval_args("vit_t_dense.yaml", weights, data_root, *extra))
    assert exit_info.value.code == 2
    if message:
        assert re.search(message, capsys.readouterr().err)


def test_list_options_say_how_to_give_a_list(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    argv = eval_args("vit_t_dense.yaml", weights, data_root)
    with pytest.raises(SystemExit):
        run("calibrate", *argv[1:], "--split_layers", "4")
    assert "--split_layers takes a list in brackets, e.g. --split_layers '[10, 11]'" in capsys.readouterr().err


def test_images_of_another_size_are_refused_before_the_run(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"gives 64x64 images but .* built for 224x224: set --model.model_kwargs"):
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--data.img_size", "64"))


def test_runs_without_a_logger_never_replace_an_earlier_result(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    # Was: every run without a logger rewrote ./metrics.json (and ./config.yaml, the user's own too).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("# the user's own config\n")
    args = eval_args("vit_t_dense.yaml", weights, data_root, "--trainer.logger", "false", "--data.limit", "3")
    run(*args)
    run(*args, "--data.limit", "2")
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 3
    assert json.loads((tmp_path / "metrics_1.json").read_text())["num_images"] == 2
    assert (tmp_path / "config.yaml").read_text() == "# the user's own config\n"
    assert yaml.safe_load((tmp_path / "config_2.yaml").read_text())["data"]["limit"] == 2
    out = capsys.readouterr().out
    assert out.index("num_images        2") < out.index(f"wrote {tmp_path / 'metrics_1.json'}")  # shown, then written


def test_an_option_of_another_merger_names_it_and_the_switch(tmp_path, monkeypatch, capsys, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(*eval_args("vit_t_atm.yaml", weights, data_root, "--model.merger.r", "8"))
    err = capsys.readouterr().err
    assert "Option 'r' is not accepted" in err
    assert "r is an option of ToMe, not of ATM (the merger this command line runs); to switch, pass " \
        "--model.merger ToMe --model.merger.r 8" in err
    with pytest.raises(SystemExit):
        run(*eval_args("vit_t_tome.yaml", weights, data_root, "--model.merger.init_args.keep_rate=0.7"))
    assert "keep_rate is an option of EViT, not of ToMe" in capsys.readouterr().err


def test_a_damaged_checkpoint_to_resume_from_is_named(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)  # was: "PytorchStreamReader failed", naming neither file nor option
    truncated = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    fit = ["fit", *eval_args("vit_t_tome.yaml", weights, data_root)[1:], "--ckpt_path", str(truncated)]
    with pytest.raises(ValueError, match=rf"cannot resume from --ckpt_path {truncated} .* drop --ckpt_path"):
        run(*fit)


def test_fast_dev_run_writes_metrics_where_a_run_without_logger_does(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    run(*eval_args("vit_t_dense.yaml", weights, data_root, "--trainer.fast_dev_run", "true", "--data.batch_size", "8"))
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 8


def test_dataset_size_mismatch_fails_loudly(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"evaluated 6 images but the val set has 8"):
        run(*eval_args("vit_t_dense.yaml", weights, data_root, "--trainer.limit_val_batches", "2"))


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(config: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("validate", "--config", str(CONFIGS / config), "--data.root", "R", "--print_config")
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["pretrained"] is True
    # Merge statistics and pictures; fine-tuning configs: statistics and two checkpoints (best, last).
    assert len(printed["trainer"]["callbacks"]) == (3 if config.endswith("_ft.yaml") else 2)


@pytest.mark.parametrize("short", ["deit_t", "deit_s", "deit_b", "vit_t"])
def test_short_name_config_is_the_atm_config(short: str) -> None:
    same = [yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) for name in (short, f"{short}_atm")]
    assert same[0] == same[1]


def test_model_compile_option_compiles_the_blocks(tmp_path, monkeypatch, data_root, weights) -> None:
    monkeypatch.chdir(tmp_path)
    args = eval_args("vit_t_atm.yaml", weights, data_root, "--model.compile", "true")
    cli = ATMCLI(args=args[1:], run=False)  # instantiated, not run: compiling takes a minute
    assert cli.model.model._merging.run_block is compiled_block("inductor")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # another class starts from its own defaults: not the ATM point's calibrated rerun
        (["--model.merger", "ToMe", "--model.merger.r", "2"], {"r": 2, "rerun_margin": 0.0, "last_block_prefix_only": False}),
        (["--model.merger=ToMe", "--model.merger.rerun_margin=0.1"], {"rerun_margin": 0.1, "last_block_prefix_only": False}),
        (["--model.merger", "EViT"], {"prop_attn": False, "rerun_margin": 0.0}),
        # the same class again keeps the config's settings, as jsonargparse does
        (["--model.merger", "ATM", "--model.merger.beta", "0.03"], {"beta": 0.03, "theta_min": 0.70835, "rerun_margin": 0.0489}),
    ],
)
def test_merger_named_on_the_command_line_starts_from_its_defaults(
    tmp_path, monkeypatch, data_root, weights, extra, expected
) -> None:
    monkeypatch.chdir(tmp_path)
    run(*eval_args("vit_t_atm_40.yaml", weights, data_root, *extra))
    merger = metrics(tmp_path)["merger"]
    assert {key: merger[key] for key in expected} == expected


def test_merger_switch_reads_the_last_class_and_the_settings_after_it() -> None:
    from atm_lightning.merger_switch import merger_switch

    argv = ["validate", "--model.merger.r", "4", "--model.merger", "ATM", "--model.merger", "atm_lightning.ToMe",
            "--model.merger.r=8", "--data.limit", "3", "--model.merger.init_args.prop_attn", "false"]  # fmt: skip
    without, name, explicit = merger_switch(argv)
    assert name == "ToMe" and explicit == {"r", "prop_attn"}
    assert without == ["validate", "--model.merger.r", "4", "--model.merger", "ATM", "--data.limit", "3"]
    assert merger_switch(["validate", "--model.merger", '{"class_path": "ToMe"}']) is None
