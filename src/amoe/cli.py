"""``amoe`` command line: LightningCLI (fit, validate, test, predict) plus inspect-data, evaluate-maps, bench, export.

``amoe export`` and ``amoe predict --model DIR`` (an exported model) are in :mod:`amoe.export`.

Each ``fit`` gets its own run directory ``<trainer.default_root_dir>/<timestamp>`` (checkpoints, CSV
logs, the resolved config) and ``<trainer.default_root_dir>/latest`` points at the newest; ``--ckpt_path
last`` resolves to ``latest/checkpoints/last.ckpt`` (resume for fit; the trained model for test/predict).

Checkpoints load with ``weights_only=True`` (:mod:`amoe.checkpoint`). With ``--ckpt_path`` the model
settings come from the checkpoint (LightningCLI's behaviour); an architecture setting given explicitly
on the command line that differs from the checkpoint is refused, other explicit ``--model.*`` settings
(results_root, eval_size, map_norm, …) are kept.

``amoe predict --ckpt_path X --data.path DIR`` scores any folder of images whatever data module the
config names: the data becomes ``data_modules.folder.Folder(path=DIR)`` with the batch/worker settings of
the configured module and the image geometry the checkpoint was trained with; results are written by
:class:`amoe.predict.PredictionWriter` to ``<model.results_root>/predict/<run>``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from amoe.checkpoint import (
    AMOE_KEY,
    ARCH_KEYS,
    CheckpointError,
    SettingsError,
    config_mismatches,
    safe_load,
    saved_config,
)
from amoe.encoder import EncoderWeightsError
from amoe.hardware import retain_freed_memory, warn_if_bf16_is_slow
from amoe.module import AnomalyMoEModule
from amoe.results import make_run_dir
from amoe.wandb_mode import wandb_wanted
from data_modules.base import AnomalyDataModule, DataError

log = logging.getLogger("amoe")


class UsageError(RuntimeError):
    """A command-line setting the user must change (the message says which and how)."""


def resolve_last(base: str) -> str:
    """``latest/checkpoints/last.ckpt`` (a link to the newest epoch checkpoint); if a kill hit the moment
    the link is replaced, the newest ``*.ckpt`` of the folder."""
    folder = os.path.join(base, "latest", "checkpoints")
    path = os.path.join(folder, "last.ckpt")
    if os.path.isfile(path):
        return os.path.realpath(path)
    found = sorted((p for p in Path(folder).glob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime)
    if found:
        log.warning("--ckpt_path last: '%s' is missing; using the newest checkpoint '%s'.", path, found[-1])
        return os.path.realpath(found[-1])
    raise UsageError(
        f"--ckpt_path last: no checkpoint at '{path}'. Train first (amoe fit … with trainer.default_root_dir "
        f"'{base}'), or pass the checkpoint file's path."
    )


def explicit_keys(args: list[str], prefix: str) -> set[str]:
    """Dotted keys given on the command line under ``prefix`` (``--model.config.top_k 2`` -> ``config.top_k``)."""
    keys = set()
    for a in args:
        if a.startswith(f"--{prefix}.") and len(a) > len(prefix) + 3:
            keys.add(a[len(prefix) + 3 :].split("=", 1)[0])
    return keys


def pop_prefixed(args: list[str], prefix: str) -> tuple[list[str], dict[str, str]]:
    """Remove every ``--<prefix>.KEY VALUE`` / ``--<prefix>.KEY=VALUE`` from args; return (rest, {KEY: VALUE})."""
    rest, found, i = [], {}, 0
    start = f"--{prefix}."
    while i < len(args):
        a = args[i]
        if a.startswith(start) and len(a) > len(start):
            key, eq, value = a[len(start) :].partition("=")
            if not eq and i + 1 < len(args):
                value, i = args[i + 1], i + 1
            found[key] = value
        else:
            rest.append(a)
        i += 1
    return rest, found


PREDICT_DATA_KEYS = ("image_size", "crop_size", "batch_size", "eval_batch_size", "num_workers", "skip_bad_files")


class AmoeCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        args = list(sys.argv[1:] if args is None else args)
        self.predict_path, self.predict_data_args = None, {}
        if args and args[0] == "predict" and any(a == "--data.path" or a.startswith("--data.path=") for a in args):
            args, self.predict_data_args = pop_prefixed(args, "data")  # any config's data: see predict_data()
            self.predict_path = self.predict_data_args.pop("path")
        self.cli_args = args
        self.ckpt_meta: dict = {}
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
        # Every epoch: write epoch=E-step=S.ckpt (atomically; the previous one is removed after) and point
        # last.ckpt at it (replaced on resume, not versioned). With save_top_k 0, Lightning >= 2.6 writes
        # last.ckpt only when training ends. The checkpoint a run resumed from is kept.
        parser.set_defaults({
            "checkpoint.save_last": "link", "checkpoint.save_top_k": 1, "checkpoint.every_n_epochs": 1,
            "checkpoint.enable_version_counter": False,
        })
        parser.add_argument(
            "--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
            help="W&B logging: auto = online with W&B credentials, otherwise offline (off with WANDB_MODE=disabled); "
            "online without credentials falls back to offline; never prompts. CSV logs are always written.",
        )
        parser.add_argument("--wandb_project", default="amoe", help="W&B project name.")
        parser.add_argument("--wandb_group", default=None, help="W&B group (e.g. one ablation set).")
        parser.add_argument("--wandb_tags", default=None, help="W&B tags, comma-separated (e.g. setting and dataset).")
        parser.add_argument(
            "--threshold", type=float | None, default=None,
            help="predict only: image-score threshold for 'anomalous' (default: the checkpoint's, calibrated on "
            "held-out normal training images).",
        )
        parser.add_argument(
            "--pixel_threshold", type=float | None, default=None,
            help="predict only: map threshold of the binary masks (default: the checkpoint's calibrated one).",
        )

    def check_data_first(self, cfg) -> None:
        """Check the dataset root before building the (large) model, so a missing dataset fails fast."""
        data = cfg.get("data")
        if data is None or self.subcommand == "predict":
            return
        module, _, name = data.class_path.rpartition(".")
        klass = getattr(importlib.import_module(module), name)
        init = data.get("init_args")
        klass(**(init.as_dict() if init is not None else {})).check_root()

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's: the model settings come from the checkpoint, but the file is loaded safely
        (weights_only, clear errors), an explicit command-line architecture setting that contradicts the
        checkpoint is refused, and explicit non-architecture ``--model.*`` settings are kept."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = safe_load(ckpt_path)
        source = f"checkpoint '{ckpt_path}'"
        saved = saved_config(ckpt, source)
        self.ckpt_meta = ckpt.get(AMOE_KEY) or {}
        hparams = dict(ckpt.get("hyper_parameters") or {})
        del ckpt
        hparams.pop("_instantiator", None)
        explicit = explicit_keys(self.cli_args, "model")
        current = self.config[sub].model.config
        current = current.as_dict() if isinstance(current, Namespace) else dict(current or {})
        diffs = config_mismatches(saved, current)
        refused = [d for d in diffs if f"config.{d[0]}" in explicit]
        if refused:
            lines = "\n".join(f"  --model.config.{k} {b!r}: the checkpoint has {a!r}" for k, a, b in refused)
            raise CheckpointError(
                f"{source} was trained with other model settings than given on the command line:\n{lines}\n"
                "A trained model's architecture cannot be changed: drop these options, or train a new model."
            )
        if diffs:
            log.warning(
                "%s: using the checkpoint's model settings instead of the config's: %s", source,
                ", ".join(f"{k}={a!r} (config: {b!r})" for k, a, b in diffs),
            )
        # architecture from the checkpoint; other settings from the checkpoint unless given on the command line
        hparams["config"] = {
            k: v if k in ARCH_KEYS or f"config.{k}" not in explicit else current.get(k, v) for k, v in saved.items()
        }
        for key in list(hparams):
            if key != "config" and key in explicit:
                hparams.pop(key)
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def predict_data(self, cfg) -> None:
        """``--data.path DIR``: predict on a folder, whatever data module the config names."""
        init = cfg.data.get("init_args") if cfg.get("data") is not None else None
        init = init.as_dict() if isinstance(init, Namespace) else dict(init or {})
        kw = {k: init[k] for k in PREDICT_DATA_KEYS if k in init}
        kw.update(self.ckpt_meta.get("data") or {})  # the geometry the model was trained with
        accepted = set(inspect.signature(AnomalyDataModule.__init__).parameters) - {"self", "root", "kwargs"}
        for key, value in self.predict_data_args.items():  # explicit --data.* options apply to the folder
            if key not in accepted:
                raise UsageError(
                    f"--data.{key} does not apply to predicting on a folder (--data.path); accepted: "
                    + ", ".join(f"--data.{k}" for k in sorted(accepted))
                )
            kw[key] = yaml.safe_load(value)
        cfg.data = Namespace(class_path="data_modules.folder.Folder", init_args=Namespace(path=self.predict_path, **kw))

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        if self.subcommand != "predict" and (cfg.get("threshold") is not None or cfg.get("pixel_threshold") is not None):
            raise UsageError("--threshold and --pixel_threshold apply to `amoe predict` only.")
        self.check_data_first(cfg)
        warn_if_bf16_is_slow(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
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
        if self.subcommand == "predict":
            if not ckpt:
                raise UsageError("amoe predict needs a trained model: pass --ckpt_path PATH (or --ckpt_path last).")
            if self.predict_path is not None:
                self.predict_data(cfg)

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
                        tags=[t for t in (cfg.wandb_tags or "").split(",") if t] or None,
                    )
                )
            kwargs["logger"] = loggers
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "predict":
            from amoe.predict import PredictionWriter

            hp = self.model.hparams
            trainer.callbacks.append(
                PredictionWriter(hp.results_root, hp.run_name, cfg.threshold, cfg.pixel_threshold, cfg.ckpt_path)
            )
        return trainer

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("weights_only", False) is None:
            kwargs["weights_only"] = True  # checkpoints hold tensors and plain values only (amoe.checkpoint)
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer streams results to disk; keep nothing in memory
        return kwargs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen encoder, by design
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    retain_freed_memory()  # no page faults on every step's activations (AMOE_MALLOC=system: glibc defaults)
    cmd = argv[0] if argv else ""
    if cmd == "inspect-data":
        from data_modules.inspect import main as inspect_main

        return inspect_main(argv[1:])
    if cmd == "evaluate-maps":
        from amoe.metrics import main_evaluate_maps

        return main_evaluate_maps(argv[1:])
    if cmd == "export":  # deployment: TorchScript / ONNX / OpenVINO model folder (docs/DEPLOY.md)
        from amoe.export import main as export_main

        return export_main(argv[1:])
    if cmd == "predict" and any(a == "--model" or a.startswith("--model=") for a in argv):
        from amoe.export import predict_main  # an exported model folder instead of a checkpoint

        return predict_main(argv[1:])
    if cmd == "bench" and any(a == "--runtime" or a.startswith("--runtime=") for a in argv):
        from amoe.bench_runtime import main as bench_runtime_main

        return bench_runtime_main(argv[1:])
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
    except (DataError, EncoderWeightsError, UsageError, SettingsError) as e:
        print(f"\namoe: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"\namoe: training stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
