"""``amoe`` command line: LightningCLI (fit, validate, test, predict) plus inspect-data, evaluate-maps, bench.

Each ``fit`` gets its own run directory ``<trainer.default_root_dir>/<timestamp>`` (checkpoints, CSV
logs, the resolved config) and ``<trainer.default_root_dir>/latest`` points at the newest; ``--ckpt_path
last`` resolves to ``latest/checkpoints/last.ckpt`` (resume for fit; the trained model for test/predict).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from amoe.encoder import EncoderWeightsError
from amoe.module import AnomalyMoEModule
from amoe.results import make_run_dir
from data_modules.base import AnomalyDataModule, DataError

log = logging.getLogger("amoe")


class UsageError(RuntimeError):
    """A command-line setting the user must change (the message says which and how)."""


def resolve_last(base: str) -> str:
    path = os.path.join(base, "latest", "checkpoints", "last.ckpt")
    if not os.path.isfile(path):
        raise UsageError(
            f"--ckpt_path last: no checkpoint at '{path}'. Train first (amoe fit … with trainer.default_root_dir "
            f"'{base}'), or pass the checkpoint file's path."
        )
    return os.path.realpath(path)


def wandb_credentials() -> bool:
    """Whether W&B can log in without asking: WANDB_API_KEY, or a key stored by ``wandb login`` (~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_wanted(mode: str) -> str | None:
    """The W&B mode for --wandb; never one that prompts.

    auto: online with credentials (WANDB_API_KEY or ``wandb login``), otherwise offline (``wandb sync`` the
    run directory later); off when WANDB_MODE=disabled. online without credentials falls back to offline
    with a warning. disabled: no W&B logger. The CSV logger is always on.
    """
    env = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled" or (mode == "auto" and env == "disabled"):
        return None
    if mode == "auto":
        return "offline" if env in ("offline", "dryrun") or not wandb_credentials() else "online"
    if mode == "online" and not wandb_credentials():
        log.warning("--wandb online: no W&B credentials (WANDB_API_KEY or `wandb login`); logging offline instead.")
        return "offline"
    return mode


class AmoeCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            AnomalyMoEModule,
            AnomalyDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_epochs": 1})
        parser.add_argument(
            "--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
            help="W&B logging: auto = online with W&B credentials, otherwise offline (off with WANDB_MODE=disabled); "
            "online without credentials falls back to offline; never prompts. CSV logs are always written.",
        )
        parser.add_argument("--wandb_project", default="amoe", help="W&B project name.")
        parser.add_argument("--wandb_group", default=None, help="W&B group (e.g. one ablation set).")

    def check_data_first(self, cfg) -> None:
        """Check the dataset root before building the (large) model, so a missing dataset fails fast."""
        data = cfg.get("data")
        if data is None or self.subcommand == "predict":
            return
        module, _, name = data.class_path.rpartition(".")
        klass = getattr(importlib.import_module(module), name)
        init = data.get("init_args")
        klass(**(init.as_dict() if init is not None else {})).check_root()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        self.check_data_first(cfg)
        base = cfg.trainer.default_root_dir or os.path.join("runs", "default")
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            cfg.ckpt_path = ckpt = resolve_last(base)
            self._parse_ckpt_path()  # the model settings stored in the checkpoint
            cfg = self.config[self.subcommand]
        elif ckpt and not os.path.isfile(ckpt):
            raise UsageError(f"--ckpt_path '{ckpt}' does not exist.")
        if ckpt and os.path.basename(os.path.dirname(ckpt)) == "checkpoints":
            run_dir = os.path.dirname(os.path.dirname(ckpt))  # continue in the run that wrote the checkpoint
        elif os.environ.get("AMOE_RUN_DIR") and int(os.environ.get("LOCAL_RANK", "0")) > 0:
            run_dir = os.environ["AMOE_RUN_DIR"]  # a DDP worker process: reuse the directory rank 0 created
        else:
            run_dir = make_run_dir(base)
        os.environ["AMOE_RUN_DIR"] = run_dir
        cfg.trainer.default_root_dir = run_dir
        cfg.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")
        self.run_dir = run_dir

    def instantiate_trainer(self, **kwargs):
        cfg = self.config[self.subcommand]
        if cfg.trainer.get("logger") in (None, True):
            loggers = [CSVLogger(self.run_dir, name="csv")]
            mode = wandb_wanted(cfg.wandb)
            if mode:
                from lightning.pytorch.loggers import WandbLogger

                loggers.append(
                    WandbLogger(
                        project=cfg.wandb_project, group=cfg.wandb_group, save_dir=self.run_dir,
                        offline=mode == "offline", name=os.path.basename(self.run_dir), job_type=self.subcommand,
                    )
                )
            kwargs["logger"] = loggers
        return super().instantiate_trainer(**kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen encoder, by design
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    cmd = argv[0] if argv else ""
    if cmd == "inspect-data":
        from data_modules.inspect import main as inspect_main

        return inspect_main(argv[1:])
    if cmd == "evaluate-maps":
        from amoe.metrics import main_evaluate_maps

        return main_evaluate_maps(argv[1:])
    if cmd == "bench":
        from amoe.bench import main as bench_main

        return bench_main(argv[1:])
    if cmd == "reproduce":
        from amoe.reproduce import main as reproduce_main

        return reproduce_main(argv[1:])
    if cmd == "ablations":
        from amoe.ablations import main as ablations_main

        return ablations_main(argv[1:])
    try:
        AmoeCLI(args=argv)
    except (DataError, EncoderWeightsError, UsageError) as e:
        print(f"\namoe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
