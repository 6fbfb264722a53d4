"""One training configuration (``TrainConfig``) and its options: plain data, no torch, no Ray.

Field names are the keys of ``cxr-ray train --set``, of a spec's ``model``/``fixed`` blocks and of
its search space, so the spec, the CLI and the report can check and show configurations without
importing the training stack.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import CxrError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
IMBALANCE = ("weighted_loss", "sampler", "none")
# none; mild: small affine jitter and exposure; strong: random resized crops whose width/height ratio
# is jittered (0.6-1.67), rotation, gamma, contrast, blur and noise (training.augment_strong)
AUGMENTATIONS = ("none", "mild", "strong")
# linear: dropout -> one logit. keras16: the head of the original Keras experiments,
# Dense(hidden=16, ReLU) -> Dropout -> Dense(1).
HEADS = ("linear", "keras16")
ENGINES = ("auto", "tune", "train")  # how a study runs a trial: see study.py
# Validation metrics a run reports every epoch that a study may select on (and that runs export as gauges).
SELECTION_METRICS = ("val_auroc", "val_accuracy_youden", "val_f1_youden", "val_loss")


class ConfigError(CxrError, ValueError):
    """A training setting is unknown or out of range."""


@dataclass
class TrainConfig:
    """One training configuration."""

    backbone: str = "resnet18"
    head: str = "linear"
    hidden: int = 16
    dropout: float = 0.5
    pretrained: bool | str = False
    image_size: int = 64
    epochs: int = 5
    batch_size: int = 64  # global: split evenly over workers, so results do not depend on worker count
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    freeze_epochs: int = 0  # linear-probe epochs with the backbone frozen, then full fine-tuning
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    imbalance: str = "weighted_loss"
    augment: str = "mild"
    ema_decay: float = 0.0  # > 0: validate, checkpoint and serve an exponential moving average of the weights
    seed: int = 0
    threads: int = 0  # torch intra-op threads per worker; 0 = the worker's CPU allotment
    evaluate_test: bool = False  # score the test split after the last epoch (final evaluation runs)
    # identity, copied into checkpoint metadata
    study: str = ""
    arm: str = ""
    spec_hash: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        def check(ok, key, msg):
            if not ok:
                raise ConfigError(f"{where}: {key} {msg} (got {getattr(self, key)!r})")

        check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        check(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        check(self.imbalance in IMBALANCE, "imbalance", f"must be one of {', '.join(IMBALANCE)}")
        check(self.augment in AUGMENTATIONS, "augment", f"must be one of {', '.join(AUGMENTATIONS)}")
        check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        check(self.head in HEADS, "head", f"must be one of {', '.join(HEADS)}")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0, "warmup_epochs",
              "must be < epochs")
        check(0 <= self.freeze_epochs < self.epochs or self.freeze_epochs == 0, "freeze_epochs", "must be < epochs")
        check(self.hidden >= 1, "hidden", "must be >= 1")
