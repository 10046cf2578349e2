"""The ``atm`` command: LightningCLI over TokenMergingModule and ImageNetDataModule, plus two tools.

``atm validate --config configs/deit_s_atm.yaml --model.weights W --data.root R`` evaluates one
operating point and writes ``metrics.json`` next to the TensorBoard events; ``fit``, ``test`` and
``calibrate`` work the same way. ``atm compare`` and ``atm benchmark`` have their own parsers
(:mod:`atm_lightning.evaluation`).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, NoReturn

import yaml
from jsonargparse import ArgumentError, lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from . import callbacks  # noqa: F401 - lets --trainer.callbacks+=MergeStatsCallback resolve short names
from .calibration import Calibration
from .data import ImageNetDataModule
from .data.imagenet import default_num_workers
from .failures import failure_summary
from .merger_switch import merger_switch, own_defaults
from .models import check_input_size
from .module import TokenMergingModule
from .parse_errors import explain_parse_error
from .quiet import silence_lightning_tips
from .results import format_table, result_row, write_metrics
from .runs import METHOD_IN_NAME, DiscardUnusedRunFolder, SaveConfigAside, new_run_folder, run_name
from .threads import set_threads
from .trainer import ATMTrainer, check_accelerator, fit_precision
from .user_errors import CommandError, one_line_errors, take_debug_flag
from .weights import check_resume_checkpoint

EVAL_SUBCOMMANDS = ("validate", "test")
# Subcommands that run a given model as it is (a checkpoint's saved settings would replace it).
INFERENCE_SUBCOMMANDS = (*EVAL_SUBCOMMANDS, "predict")
# Subcommands whose numbers come from the model's predictions, so a random new head is refused.
PREDICTING_SUBCOMMANDS = (*INFERENCE_SUBCOMMANDS, "calibrate")
# Commands with their own parsers: `atm compare ...` runs <module>.cli(rest of the arguments).
TOOLS = {"compare": "atm_lightning.evaluation.compare", "benchmark": "atm_lightning.evaluation.benchmark"}
TOOLS_HELP = (
    "Also: `atm compare --help` (dense, ToMe, ATM and checkpoints on the same images: table, CSV, "
    "plot) and `atm benchmark --help` (img/s next to the FLOPs ratio, on real images). A mistake "
    "in the settings, files or images ends as one `error:` line; --debug (or ATM_DEBUG=1) shows its traceback."
)


class ATMCLI(LightningCLI):
    """LightningCLI that links model and data settings and reports each evaluation as a result row.

    Args:
        raise_parse_errors: raise a command-line mistake as ValueError (for tools that run the CLI
            in-process and report errors their own way) instead of printing usage and exiting.
        **kwargs: go to LightningCLI (e.g. ``args=[...]``, ``run=False`` in tests).
    """

    def __init__(self, raise_parse_errors: bool = False, **kwargs: Any) -> None:
        self.raise_parse_errors = raise_parse_errors
        silence_lightning_tips()
        defaults = {
            "model_class": TokenMergingModule,
            "datamodule_class": ImageNetDataModule,
            "trainer_class": ATMTrainer,
            "seed_everything_default": 0,
            "save_config_callback": SaveConfigAside,
            "save_config_kwargs": {"overwrite": True},
            # Parse errors come back as exceptions, so parse_arguments can add what would fix them.
            "parser_kwargs": {
                "exit_on_error": False,
                "epilog": TOOLS_HELP,
                **{name: {"exit_on_error": False} for name in self.subcommands()},
            },
            "trainer_defaults": {
                "logger": lazy_instance(TensorBoardLogger, save_dir="runs", default_hp_metric=False)
            },
        }
        super().__init__(**{**defaults, **kwargs})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``calibrate`` (see :class:`.ATMTrainer`); its
        ``base_config`` is this CLI's parsed config, not an option."""
        return {**LightningCLI.subcommands(), "calibrate": {"model", "datamodule", "base_config"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model name picks the eval preprocessing and the head size the labels: one source each.
        parser.link_arguments("model.model_name", "data.model_name", apply_on="parse")
        parser.link_arguments("model.num_classes", "data.num_classes", apply_on="parse")
        # Distillation learns from the dense model's outputs: its training images need no labels.
        parser.link_arguments("model.distill", "data.train_labels", compute_fn=lambda distill: distill is None, apply_on="parse")
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="torch intra-op threads of each process; default: the cores the DataLoader workers leave (at least 1)",
        )  # fmt: skip

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            argv = sys.argv[1:] if args is None else args
            self._parse_error(parser, explain_parse_error(str(err), [str(a) for a in argv or []]))
        subcommand = self.config.get("subcommand")
        if subcommand == "fit" and self.config.fit.get("ckpt_path"):
            check_resume_checkpoint(self.config.fit.ckpt_path)  # LightningCLI reads it next
        argv = sys.argv[1:] if args is None else args
        if subcommand and isinstance(argv, list):
            self._start_switched_merger_from_its_defaults(parser, argv, subcommand)
        if subcommand in INFERENCE_SUBCOMMANDS and self.config[subcommand].get("ckpt_path"):
            # LightningCLI would re-parse the checkpoint's saved hyperparameters on top of the
            # command line, silently replacing the merge settings being evaluated.
            self._parse_error(
                parser,
                f"--ckpt_path is for resuming fit only; with {subcommand}, a checkpoint's saved "
                f"settings would silently override --model.merger. Evaluate it with "
                f"--model.weights {self.config[subcommand]['ckpt_path']} instead",
            )
        strategy = self.config[subcommand].trainer.get("strategy") if subcommand else None
        if isinstance(strategy, str) and any(word in strategy for word in ("spawn", "fork", "notebook")):
            self._parse_error(
                parser,
                f"--trainer.strategy {strategy} runs the ranks in child processes, which neither find the "
                f"patched model's class nor return its results: use --trainer.strategy ddp",
            )
        if subcommand in PREDICTING_SUBCOMMANDS and self.config[subcommand].model.new_head:
            self._parse_error(
                parser,
                f"--model.new_head true gives the model an untrained classifier, so {subcommand} would "
                f"report chance-level predictions; it is for fit (fine-tuning to another label set). "
                f"Drop it and set --model.num_classes to the classes of the weights' head",
            )

    def _start_switched_merger_from_its_defaults(self, parser: LightningArgumentParser, argv: list[str], subcommand: str) -> None:
        """See :mod:`.merger_switch`: only where the command line changed the merger's class."""
        switch = merger_switch([str(arg) for arg in argv])
        merger = self.config[subcommand].model.get("merger")
        if switch is None or merger is None or not hasattr(merger, "init_args"):
            return
        without, name, explicit = switch
        previous = parser.parse_args(without).get(f"{subcommand}.model.merger")
        if str(getattr(previous, "class_path", "")).rsplit(".", 1)[-1] == name:
            return  # the same class again: the config's settings stay, as jsonargparse keeps them
        settings = own_defaults(name, dict(vars(merger.init_args)), explicit)
        for key, value in settings.items():
            merger.init_args[key] = value

    def _parse_error(self, parser: LightningArgumentParser, message: str) -> NoReturn:
        if self.raise_parse_errors:
            raise ValueError(message)
        parser.exit_on_error = True
        parser.error(message)

    def before_instantiate_classes(self) -> None:
        """Name the run by the method that runs: a config's run name with another method in it
        (``vit_t_atm`` with ``--model.merger ToMe``) gets that method instead (``vit_t_tome``).
        ``fit`` without a ``--trainer.precision`` gets the one chosen for its device."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        check_accelerator(config.trainer.get("accelerator"))
        if subcommand == "fit" and config.trainer.get("precision") is None:
            config.trainer.precision = fit_precision(config.trainer.get("accelerator"))
            rank_zero_info(f"precision {config.trainer.precision} (for this device; set --trainer.precision to choose)")
        merger = config.model.get("merger")
        method = METHOD_IN_NAME.get(str(getattr(merger, "class_path", "")).rsplit(".", 1)[-1])
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            name = getattr(getattr(logger, "init_args", None), "name", None)
            if method is None or not isinstance(name, str) or run_name(name, method) == name:
                continue
            logger.init_args.name = run_name(name, method)
            rank_zero_info(f"run name {logger.init_args.name}, not {name}: the merger is {merger.class_path}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(DiscardUnusedRunFolder(new_run_folder(trainer)))
        return trainer

    def _set_threads(self, workers_idle: bool = False) -> None:
        """Intra-op threads against the DataLoader workers (see :mod:`atm_lightning.threads`).

        ``workers_idle``: the workers only feed a first pass (calibration then runs its many
        merged passes from memory), so the default takes every core."""
        subcommand = self.config.get("subcommand")
        threads = self.config[subcommand].get("threads") if subcommand else self.config.get("threads")
        workers = getattr(self.datamodule, "num_workers", None)
        devices = self.trainer.num_devices
        if workers is None:
            workers = default_num_workers(devices)
        count = set_threads(threads, 0 if workers_idle else workers, devices)
        self.threads = {"threads": count, "num_workers": workers}

    def _before_run(self, workers_idle: bool = False) -> None:
        """Refuse images the model was not built for, before any is read; then set the threads."""
        input_size = self.datamodule.data_config["input_size"][1:]
        check_input_size(self.model.model, input_size, self.model.hparams.model_name)
        self._set_threads(workers_idle)

    def before_fit(self) -> None:
        self._before_run()

    def before_validate(self) -> None:
        self._before_run()

    def before_test(self) -> None:
        self._before_run()

    def before_predict(self) -> None:
        self._before_run()

    def before_calibrate(self) -> None:
        self._before_run(workers_idle=True)

    def calibrate(self, **options: Any) -> Calibration:
        """Run ``trainer.calibrate``; the calibrated file is this very config with a new merger,
        so ``atm validate --config`` takes it as given."""
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_check=True))
        return self.trainer.calibrate(**options, base_config=dumped["calibrate"])

    def after_validate(self) -> None:
        self._report("val")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        """Check that every image was evaluated exactly once, then write and print the row (rank 0)."""
        results = self.model.results.get(stage)
        if results is None:
            raise CommandError(
                f"no {stage} results reached the main process; strategies that run ranks in child "
                f"processes (ddp_spawn, ddp_fork) do not return module state: use --trainer.strategy ddp"
            )
        dataset = self.datamodule.val_dataset if stage == "val" else self.datamodule.test_dataset
        if results["num_images"] != len(dataset):
            raise CommandError(
                f"evaluated {results['num_images']} images but the {stage} set has {len(dataset)}; "
                f"a sampler padded or dropped images, or limit_{stage}_batches or fast_dev_run is set. "
                f"Numbers from this run are not comparable"
            )
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if log_dir is None:  # fast_dev_run replaces the loggers: write where a run without logger does
            log_dir = self.trainer.default_root_dir
        if not self.trainer.is_global_zero:
            return
        hparams = self.model.hparams
        row = result_row(
            results,
            stage=stage,
            model_name=hparams.model_name,
            weights=hparams.weights,
            pretrained=hparams.pretrained,
            merger=self.model.merger,
            data_config=self.datamodule.data_config,
            batch_size=self.datamodule.batch_size,
            world_size=self.trainer.world_size,
            hflip=getattr(self.datamodule, "eval_hflip", False),
        )
        row |= getattr(self, "threads", {})  # set before the run by _set_threads
        row["merge_step"] = merge_step_kind(self.model)
        print(format_table(row))  # before writing: a result that cannot be written is still shown
        print(f"wrote {write_metrics(row, log_dir)}")


def merge_step_kind(module: TokenMergingModule) -> str:
    """How the run's merge steps ran: ``fused`` (the compiled CPU kernel, see ``--model.fused``),
    ``batched``, both (``fused+batched``, e.g. some batches in another dtype), or ``none`` (dense)."""
    if not module.merger.merges:
        return "none"
    return "+".join(kind for kind in ("fused", "batched") if module.merge_steps[kind]) or "none"


def run_in_process(args: list[str]) -> ATMCLI:
    """``atm ARGS`` in this process, for commands that drive it (``atm compare``, the demo).

    A command-line mistake raises ValueError; the caller's own command line is not read.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args.*command line arguments.*")
        return ATMCLI(args=args, raise_parse_errors=True)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``atm`` console script; ``args`` lets tests drive it in-process.

    A mistake in the settings, files or images ends as one ``error:`` line (see
    :mod:`atm_lightning.user_errors`). Under DDP, a failing rank's error is repeated at the very
    end of the output (see :mod:`atm_lightning.failures`), below the peers' "connection closed"
    tracebacks.
    """
    if args is None:  # DDP ranks re-run sys.argv: --debug leaves it (ATM_DEBUG carries it on)
        sys.argv[1:] = take_debug_flag(sys.argv[1:])
    given = sys.argv[1:] if args is None else take_debug_flag(list(args))
    with one_line_errors():
        if given and given[0] in TOOLS:
            importlib.import_module(TOOLS[given[0]]).cli(given[1:])
            return
        with failure_summary():
            ATMCLI(args=None if args is None else given)


if __name__ == "__main__":
    main()
