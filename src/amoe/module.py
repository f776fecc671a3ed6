"""LightningModule: wires AnomalyMoE to optimisation, calibration, logging and evaluation."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from optimi import StableAdamW
from tqdm.auto import tqdm

from amoe.checkpoint import (
    AMOE_KEY,
    CheckpointError,
    SettingsError,
    close_epoch,
    config_mismatches,
    mismatch_message,
    rng_state,
    safe_load,
    saved_config,
    set_rng_state,
)
from amoe.compile import compile_for_inference, uncompile
from amoe.component_bank import PatchSample
from amoe.evaluation import TestCollector
from amoe.image_metrics import ImageMetrics, log_keys
from amoe.model import GROUPS, AnomalyMoE, AnomalyMoEConfig

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _same(a: float, b: float | None) -> bool:
    """Equal to 1e-9, NaN equal to NaN."""
    return b is not None and (abs(a - b) <= 1e-9 or (math.isnan(a) and math.isnan(b)))


class AnomalyMoEModule(L.LightningModule):
    """AnomalyMoE training and evaluation.

    Args:
        config: the model (``AnomalyMoEConfig``; YAML ``model.config``).
        lr, weight_decay, betas: StableAdamW (torch-optimi) settings.
        warmup_steps, min_lr_ratio: linear warm-up, then cosine to ``lr * min_lr_ratio`` at ``trainer.max_steps``.
        grad_clip: global gradient-norm clip of the main step (and of the CLUB step).
        club_lr: Adam learning rate of the EIR (CLUB) estimators.
        bank_patches_per_class: patches per class for the component k-means, drawn evenly from all of the
            class's normal training images.
        sparse_inference: run only each sample's top-K experts at test/predict time.
        compile_inference: at test/predict time, run the encoder and the patch experts as frozen inductor
            graphs (``amoe.compile``; compiled at the first batch, ~15 s per module on 2 CPU cores; bf16 −13 %
            and −20 % time on CPU, docs/PERFORMANCE.md). Off by default: compiling costs more than it saves
            on small test sets.
        results_root: test outputs go to ``results_root/<dataset>/<run>``.
        run_name: name of the results run (default: a timestamp).
        num_figure_images: images per class in the overlay and expert-map figures.
    """

    def __init__(
        self,
        config: AnomalyMoEConfig | None = None,
        lr: float = 5e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        grad_clip: float = 0.1,
        club_lr: float = 5e-4,
        bank_patches_per_class: int = 100_000,
        sparse_inference: bool = True,
        compile_inference: bool = False,
        results_root: str = "results",
        run_name: str | None = None,
        num_figure_images: int = 2,
    ):
        super().__init__()
        config = config or AnomalyMoEConfig()
        if isinstance(config, dict):
            config = AnomalyMoEConfig(**config)
        self.save_hyperparameters()
        if not isinstance(self.hparams.get("config"), dict):
            self.hparams["config"] = asdict(config)
        self.automatic_optimization = False
        self.model = AnomalyMoE(config)
        self.config = config
        self.collector: TestCollector | None = None
        # image AUROC/AP/F1-max of the test set (torchmetrics; synced across ranks, padding de-duplicated)
        self.test_image_metrics = ImageMetrics()
        self._nonfinite: torch.Tensor | None = None  # accelerator: NaN/Inf flag of the steps since the last check
        self._resume_rng: dict | None = None  # RNG state of a checkpoint being resumed (applied at train start)

    # --- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.check_data_geometry()

    def ensure_encoder_weights(self) -> None:
        # A checkpoint (resume, test, predict) brings the encoder weights with it (on_load_checkpoint marks
        # them loaded; trainer.ckpt_path is not yet set in setup()); otherwise load the configured ones now,
        # after the data module has checked its root (so a missing dataset is reported first).
        self.model.encoder.load_weights()  # no-op when already loaded

    def check_data_geometry(self) -> None:
        """The data's crop must be the encoder's input size (a checkpoint fixes the latter)."""
        t = getattr(getattr(self.trainer, "datamodule", None), "transform", None)
        if t is not None and t.crop_size != self.config.img_size:
            raise SettingsError(
                f"the data's crop_size ({t.crop_size}) differs from the model's img_size ({self.config.img_size}). "
                f"Pass --data.crop_size {self.config.img_size} with a matching --data.image_size, or use the config "
                "the model was trained with."
            )

    def on_fit_start(self) -> None:
        self.ensure_encoder_weights()
        if self.config.num_component_experts and not self.model.component_bank.is_built:
            self.build_component_bank()

    @torch.no_grad()
    def build_component_bank(self) -> None:
        """k-means (faiss) per class on patch embeddings of the normal training images (SPEC §2.5)."""
        dm = self.trainer.datamodule
        sample = PatchSample(Counter(r.cls for r in dm.split("train").records), self.hparams.bank_patches_per_class)
        for batch in tqdm(dm.bank_dataloader(), desc="component bank", disable=not self.trainer.is_global_zero):
            emb = self.model.patch_embeddings(batch["image"].to(self.device)).float().cpu()  # (B, h*w, D)
            for cls, e in zip(batch["cls"], emb):
                sample.add(cls, e)
        pooled = sample.result()
        self.model.component_bank.build(pooled, seed=0)
        self.model.component_bank.to(self.device)

    def configure_optimizers(self):
        opt = StableAdamW(
            self.model.trainable_parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
            triton=False if not torch.cuda.is_available() else None,
        )
        club = torch.optim.Adam(self.model.eir.parameters(), lr=self.hparams.club_lr, weight_decay=1e-4)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        )
        return [opt, club], [{"scheduler": sched, "interval": "step"}]

    # --- training -------------------------------------------------------------------------------
    FINITE_CHECK_EVERY = 50  # on accelerators: steps between the host syncs of the NaN/Inf checks

    def _finite_check_due(self) -> bool:
        """The NaN/Inf checks of the input and loss need a host sync. On CPU that costs nothing: every step.
        On an accelerator the flags accumulate on the device and are read every FINITE_CHECK_EVERY steps."""
        return self.device.type == "cpu" or (self.global_step + 1) % self.FINITE_CHECK_EVERY == 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt, club_opt = self.optimizers()
        sched = self.lr_schedulers()
        image = batch["image"]
        check = self._finite_check_due()
        if check and not torch.isfinite(image).all():
            raise FloatingPointError(
                f"step {self.global_step}: the input batch holds NaN/Inf values (files: {batch['path']}). "
                "Training stopped before any update; no checkpoint of this step was written."
            )
        out = self.model(image, batch["cls"])
        losses = self.model.loss(out)
        if not check:  # accelerator: remember on the device, look every FINITE_CHECK_EVERY steps (no host sync)
            bad = ~(torch.isfinite(image).all() & torch.isfinite(losses.total))
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        else:
            pending, self._nonfinite = self._nonfinite, None
            if pending is not None and bool(pending):
                raise FloatingPointError(
                    f"a NaN/Inf input or loss occurred in steps {self.global_step - self.FINITE_CHECK_EVERY + 1}.."
                    f"{self.global_step - 1} (on an accelerator the check runs every {self.FINITE_CHECK_EVERY} steps, "
                    "without a host sync in between). Training stopped; checkpoints of non-finite weights are refused. "
                    "Lower the learning rate, check the inputs, or use precision 32."
                )
            if not torch.isfinite(losses.total):
                raise FloatingPointError(
                    f"step {self.global_step}: the loss is {losses.total.item()} (reconstruction "
                    f"{losses.reconstruction.item():.4g}, ESB {losses.esb.total.item():.4g}, EIR {losses.eir.item():.4g}). "
                    "Training stopped before the update; no checkpoint of this step was written. "
                    "Lower the learning rate, check the inputs, or use precision 32."
                )
        opt.zero_grad(set_to_none=True)
        self.manual_backward(losses.total)
        self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

        if self.config.use_eir and out.reps:
            club_opt.zero_grad(set_to_none=True)
            club_loss = self.model.eir.estimator_loss(out.reps)
            self.manual_backward(club_loss)
            self.clip_gradients(club_opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            club_opt.optimizer.step()  # the raw optimizer: trainer.global_step counts main-optimizer steps only
            self.log("train/club_nll", club_loss.detach())

        bs = image.shape[0]
        self.log("train/loss", losses.total.detach(), prog_bar=True, batch_size=bs)
        self.log("train/reconstruction", losses.reconstruction.detach(), batch_size=bs)
        for name, value in zip(GROUPS, losses.per_group.detach()):
            self.log(f"train/loss_{name}", value, batch_size=bs)
        for name, value in zip(("importance", "load", "z", "total"), losses.esb):
            self.log(f"train/esb_{name}", value.detach(), batch_size=bs)
        self.log("train/eir", losses.eir.detach(), batch_size=bs)
        for name, value in zip(GROUPS, out.group_mass.detach().mean(0)):
            self.log(f"gates/{name}", value, batch_size=bs)
        expert_means = out.router.weights.detach().mean(0)
        for name, sl in zip(GROUPS, self.model.group_slices):  # per-expert gate means: gates/patch_1, …
            for j in range(sl.start, sl.stop):
                self.log(f"gates/{name}_{j - sl.start + 1}", expert_means[j], batch_size=bs)
        self.log("train/lr", sched.get_last_lr()[0], batch_size=bs)
        return losses.total.detach()

    def on_train_epoch_end(self) -> None:
        # Map-normalisation statistics and thresholds from held-out normal images; done every epoch
        # so that every checkpoint (including the last) carries statistics of its own weights.
        self.calibrate()

    @torch.no_grad()
    def calibrate(self) -> None:
        dm = self.trainer.datamodule
        was_training = self.model.training
        self.model.eval()
        maps, mass = [], []
        for batch in dm.calib_dataloader():
            with self.trainer.precision_plugin.test_step_context():  # the precision the test maps get (bf16-mixed: autocast)
                out = self.model(batch["image"].to(self.device), batch["cls"], sparse=self.hparams.sparse_inference)
            maps.append(out.group_maps.float().cpu())
            mass.append(out.group_mass.float().cpu())
        if maps:
            n = sum(len(m) for m in maps)
            if n < 20 and not getattr(self, "_warned_small_calib", False):
                self._warned_small_calib = True
                log.warning(
                    "thresholds are calibrated on only %d held-out normal image(s) (calib_fraction %s of train/good): "
                    "expect more false alarms; add normal images or raise --data.calib_fraction, or set "
                    "--threshold at predict time.", n, getattr(dm, "calib_fraction", "?"),
                )
            self.model.scorer.calibrate(torch.cat(maps), torch.cat(mass))
            sc = self.model.scorer
            self.log_dict({"calib/image_threshold": sc.image_threshold.item(), "calib/pixel_threshold": sc.pixel_threshold.item()})
        self.model.train(was_training)

    # --- checkpoints (SPEC §3): weights_only-loadable, RNG for exact resume, compatibility check -------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"step {self.global_step}: parameters hold NaN/Inf ({', '.join(bad[:3])}{'…' if len(bad) > 3 else ''}); "
                "refusing to write this checkpoint. Lower the learning rate or use precision 32, and resume from "
                "the last good checkpoint."
            )
        t = getattr(getattr(self._trainer, "datamodule", None), "transform", None) if self._trainer else None
        close_epoch(checkpoint)
        checkpoint[AMOE_KEY] = {
            "rng": rng_state(),
            "data": {"image_size": t.image_size, "crop_size": t.crop_size} if t is not None else {},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        diffs = config_mismatches(saved_config(checkpoint), asdict(self.config))
        if diffs:
            raise CheckpointError(mismatch_message("the checkpoint", diffs))
        self._resume_rng = (checkpoint.get(AMOE_KEY) or {}).get("rng")
        self.model.encoder.weights_loaded = True  # the checkpoint's state dict holds the encoder

    def on_train_start(self) -> None:
        # Resume: restore the RNG states of the checkpoint as late as possible (after set-up, which may
        # draw random numbers), so dropout, jitter and worker seeds continue as in the uninterrupted run.
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool | None = True, **kwargs):
        """Lightning's loader, safe by default (``weights_only=True``); a file that is unreadable, holds
        pickled objects, or was trained with other model settings (e.g. ``config=`` given here) is refused
        with a :class:`CheckpointError` that says why."""
        if kwargs.get("config") is not None and isinstance(checkpoint_path, str | os.PathLike):
            # an explicit config: Lightning merges it into the checkpoint's hyper-parameters before
            # on_load_checkpoint sees them, so compare with the stored one here
            given = kwargs["config"]
            given = AnomalyMoEConfig(**given) if isinstance(given, dict) else given
            source = f"checkpoint '{checkpoint_path}'"
            diffs = config_mismatches(saved_config(safe_load(str(checkpoint_path)), source), asdict(given))
            if diffs:
                raise CheckpointError(mismatch_message(source, diffs))
        try:
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
                weights_only=weights_only, **kwargs,
            )
        except CheckpointError:
            raise
        except Exception:
            if isinstance(checkpoint_path, str | os.PathLike):
                safe_load(str(checkpoint_path))  # raises a CheckpointError naming what is wrong with the file
            raise

    # --- evaluation -----------------------------------------------------------------------------
    def on_test_start(self) -> None:
        self.ensure_encoder_weights()
        dm = self.trainer.datamodule
        if not bool(self.model.scorer.calibrated) and self.config.map_norm == "train_quantile":
            log.warning("this model has no normalisation statistics (calibration never ran); calibrating now.")
            self.calibrate()
        shard_dir = None
        if self.trainer.world_size > 1:  # DDP: exact metrics from every rank's shards (see amoe.evaluation)
            import tempfile

            base = self.trainer.default_root_dir  # must be shared by all ranks (multi-node: a shared file system)
            mine = tempfile.mkdtemp(prefix="eval_shards_", dir=base) if self.trainer.is_global_zero else None
            shard_dir = self.trainer.strategy.broadcast(mine, src=0)
        self.collector = TestCollector(
            dataset=getattr(dm, "name", "dataset"),
            model=self.model,
            map_norm=self.config.map_norm,
            results_root=self.hparams.results_root,
            run_name=self.hparams.run_name,
            num_figure_images=self.hparams.num_figure_images,
            is_global_zero=self.trainer.is_global_zero,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            shard_dir=shard_dir,
            image_metrics=self.test_image_metrics,
        )
        # every rank numbers the classes alike: the test split's classes in order (None: the loader's order, 1 process)
        split = dm.split("test") if hasattr(dm, "split") else None
        classes = list(dict.fromkeys(r.cls for r in split.records)) if split is not None else None
        datasets = [self.collector.evaluator.class_dataset(c) for c in classes] if classes is not None else None
        self.test_image_metrics.set_classes(classes, datasets, self.collector.dataset)
        if self.hparams.compile_inference:  # after calibration: the graphs freeze the final weights
            compile_for_inference(self.model)

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model(batch["image"], batch["cls"], sparse=self.hparams.sparse_inference)
        masks = F.interpolate(batch["mask"].float(), size=(self.config.eval_size,) * 2, mode="nearest")[:, 0] > 0.5
        self.collector.add(batch, out, masks)

    def on_test_epoch_end(self) -> None:
        # Image AUROC/AP/F1-max come from the torchmetrics metric (every rank takes part in its sync); pixel
        # metrics, AUPRO, sPRO and the per-level / frame AUROCs from the streaming evaluator (rank 0).
        self.collector.flush()
        image = self.test_image_metrics.compute()
        self.test_image_metrics.reset()
        result = self.collector.finish(self.trainer)
        if result is None:
            return
        dataset_of = self.collector.evaluator.class_dataset
        keys = log_keys(image, dataset_of)
        check = log_keys(result, dataset_of)
        off = {k: (v, check.get(k)) for k, v in keys.items() if not _same(v, check.get(k))}
        if off:
            log.warning("torchmetrics and the streaming evaluator disagree on %d image metric(s), e.g. %s",
                        len(off), next(iter(off.items())))
        keys.update({k: v for k, v in check.items() if k not in keys})
        # float64 tensors: a float would be logged as float32 (Lightning's default dtype), off metrics.json by ~1e-8
        self.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in keys.items()}, sync_dist=False,
                      rank_zero_only=True)

    # --- prediction (amoe predict; files are written by amoe.predict.PredictionWriter) ------------------
    def on_predict_start(self) -> None:
        self.ensure_encoder_weights()
        if not bool(self.model.scorer.calibrated):
            log.warning(
                "this checkpoint has no calibration (normalisation statistics and thresholds): scores are not "
                "normalised and no image is called anomalous unless --threshold is given."
            )
        if self.hparams.compile_inference:
            compile_for_inference(self.model)

    def on_test_end(self) -> None:
        uncompile(self.model)  # a fit that goes on after a test must not run stale frozen graphs

    def on_predict_end(self) -> None:
        uncompile(self.model)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Sparse inference; returns per-image maps at the evaluation size (B, S, S) and scores (B,) on CPU."""
        out = self.model(batch["image"], batch["cls"], sparse=self.hparams.sparse_inference)
        maps, scores = self.model.score(out)
        return {
            "path": list(batch["path"]),
            "extra": list(batch.get("extra", [{}] * len(batch["path"]))),
            "maps": maps.float().cpu(),
            "scores": scores.float().cpu(),
            "group_mass": out.group_mass.float().cpu(),
            "experts": out.router.topk.cpu(),
        }
