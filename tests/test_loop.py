"""The training loop's pieces on hand-computed cases, and the loop itself in this process (no Ray):
learning-rate schedule, per-rank batches, per-epoch seeds, and the run's record (history before
checkpoint, resume from the newest complete checkpoint, retention)."""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_ray import config, data, spec as specs, study, study_layout, training


def cfg(**kw) -> config.TrainConfig:
    return config.TrainConfig(**({"backbone": "lcnet_050", "image_size": 32, "epochs": 4, "batch_size": 4} | kw))


# ----------------------------------------------------------------------------- schedule

def test_lr_factor_warmup_then_cosine_by_hand():
    c = cfg(epochs=4, warmup_epochs=1, schedule="cosine")
    steps = 10  # per epoch: 10 warm-up steps, then 30 cosine steps
    assert [training.lr_factor(s, c, steps) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert training.lr_factor(10, c, steps) == 1.0  # cosine starts at the top
    assert training.lr_factor(25, c, steps) == pytest.approx(0.5)  # halfway through 30 steps: cos(pi/2)
    assert training.lr_factor(10 + 20, c, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 3)))
    assert training.lr_factor(40, c, steps) == pytest.approx(0.0)
    assert training.lr_factor(55, c, steps) == pytest.approx(0.0)  # past the end it stays at zero


def test_lr_factor_constant_schedule_after_warmup():
    c = cfg(epochs=3, warmup_epochs=1, schedule="constant")
    assert [training.lr_factor(s, c, 4) for s in (0, 1, 3, 4, 11)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert training.lr_factor(0, cfg(schedule="constant"), 4) == 1.0  # no warm-up


# ----------------------------------------------------------------------------- batches

def test_epoch_batches_shard_one_permutation_across_ranks():
    rows, labels = np.arange(100, 120), np.zeros(120, np.int8)
    c = cfg(batch_size=4, seed=3)
    shards = [training.epoch_batches(rows, labels, c, 0, rank, 2) for rank in (0, 1)]
    for shard in shards:
        assert [len(b) for b in shard] == [2] * 5  # global batch 4 = 2 per rank; 10 rows per rank
    seen = np.concatenate([b for shard in shards for b in shard])
    assert sorted(seen) == list(range(100, 120))  # disjoint shards of the same permutation, nothing lost
    order = np.random.default_rng([3, 0]).permutation(rows)
    assert np.concatenate(shards[0]).tolist() == order[:10].tolist()
    assert np.concatenate(shards[1]).tolist() == order[10:].tolist()
    again = training.epoch_batches(rows, labels, c, 0, 0, 2)
    assert all((a == b).all() for a, b in zip(again, shards[0]))  # seeded: the same every time
    other_epoch = np.concatenate(training.epoch_batches(rows, labels, c, 1, 0, 2))
    assert other_epoch.tolist() != np.concatenate(shards[0]).tolist()


def test_epoch_batches_drop_what_does_not_split_evenly_and_single_image_batches():
    rows, labels = np.arange(13), np.zeros(13, np.int8)
    shards = [training.epoch_batches(rows, labels, cfg(batch_size=6), 0, r, 2) for r in (0, 1)]
    assert [[len(b) for b in s] for s in shards] == [[3, 3], [3, 3]]  # 13 // 2 = 6 rows each; every rank alike
    shards = [training.epoch_batches(rows, labels, cfg(batch_size=4), 0, r, 2) for r in (0, 1)]
    assert [len(b) for b in shards[0]] == [2, 2, 2]  # 6 rows in batches of 2
    assert [len(b) for b in training.epoch_batches(rows, labels, cfg(batch_size=4), 0, 0, 1)] == [4, 4, 4]
    # 13 = 4 + 4 + 4 + 1: BatchNorm cannot train on the single image


def test_balanced_sampler_draws_both_classes_equally():
    labels = np.array([1] * 90 + [0] * 10, np.int8)  # 9:1 imbalance
    rows = np.arange(100)
    drawn = np.concatenate([np.concatenate(training.epoch_batches(rows, labels, cfg(imbalance="sampler",
                                                                                    batch_size=10), e, 0, 1))
                            for e in range(20)])
    assert len(drawn) == 2000
    assert labels[drawn].mean() == pytest.approx(0.5, abs=0.03)  # 1:1 in expectation, with replacement
    plain = np.concatenate(training.epoch_batches(rows, labels, cfg(batch_size=10), 0, 0, 1))
    assert sorted(plain) == list(range(100))  # without the sampler: each row exactly once


def test_epoch_seeds_are_distinct_where_the_old_formula_collided():
    # seed*1000 + epoch*10 + rank gave (0, 1, 0) == (0, 0, 10) and (0, 100, 0) == (1, 0, 0)
    pairs = [((0, 1, 0), (0, 0, 10)), ((0, 100, 0), (1, 0, 0))]
    for a, b in pairs:
        assert training.epoch_seed(*a) != training.epoch_seed(*b)
    seeds = {training.epoch_seed(s, e, r) for s in range(3) for e in range(120) for r in range(16)}
    assert len(seeds) == 3 * 120 * 16
    assert all(0 <= x < 2**63 for x in seeds)


# ----------------------------------------------------------------------------- augmentation and EMA

def test_strong_augmentation_jitters_aspect_ratio_keeps_sides_and_range():
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < 14 ** 2).float()
    disk = disk[None, None].repeat(64, 1, 1, 1) * 0.8 + 0.1
    gen = torch.Generator().manual_seed(0)
    out = training.augment_strong(disk, gen)
    again = training.augment_strong(disk, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # a seeded stream: resumed runs see the same batches
    assert out.min() >= 0 and out.max() <= 1 and out.shape == disk.shape
    ratios = []
    for img in out[:, 0]:
        bright = img > img.mean() + 0.5 * (img.max() - img.mean())
        rows, cols = bright.any(1).nonzero(), bright.any(0).nonzero()
        ratios.append(float((cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)))
    # a round disk comes out as ellipses of both orientations: squashing is not a cue any more
    assert min(ratios) < 0.85 and max(ratios) > 1.2
    half = torch.zeros(8, 1, size, size)
    half[..., : size // 2] = 0.9  # bright left half
    flipped = training.augment_strong(half + 0.05, torch.Generator().manual_seed(1))
    left, right = flipped[..., : size // 2].mean((1, 2, 3)), flipped[..., size // 2:].mean((1, 2, 3))
    assert (left > right).all()  # never mirrored: the heart stays on the left


def test_ema_follows_the_weights_with_a_ramped_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = training.ModelEMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # decay min(0.99, 2/11)
    assert ema.module.weight.item() == pytest.approx(2 / 11 * 1.0 + 9 / 11 * 3.0)
    for _ in range(1000):
        ema.update(model)
    assert ema.module.weight.item() == pytest.approx(3.0, abs=1e-4)
    assert not ema.module.weight.requires_grad and not ema.module.training


# ----------------------------------------------------------------------------- the loop and its record

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    prepared = data.prepare("synthetic", None, 32, None, synthetic_images=120, progress=False,
                            cache_root=tmp_path_factory.mktemp("cache"))
    return {"images": np.ascontiguousarray(prepared.cache.images),
            "labels": prepared.cache.index["label"].to_numpy(np.int8), **prepared.rows}


def test_local_loop_records_each_epoch_before_reporting_and_keeps_the_newest_checkpoints(tiny, tmp_path):
    world = training.LocalWorld()
    c = cfg(epochs=3, batch_size=16, threads=1)
    training.train_loop(c, tiny, str(tmp_path), world, keep_checkpoints=2)
    history = pd.read_csv(tmp_path / "metrics.csv")
    assert history["epoch"].tolist() == [1, 2, 3] and [r["epoch"] for r in world.reports] == [1, 2, 3]
    assert sorted(training.checkpoints(str(tmp_path))) == [2, 3]  # the oldest dropped
    for report, row in zip(world.reports, history.to_dict("records")):  # what was reported was recorded first
        assert report["checkpoint_path"] == row["checkpoint"] == training.checkpoint_uri(str(tmp_path), row["epoch"])
        assert report["val_auroc"] == pytest.approx(row["val_auroc"], abs=1e-12)


@pytest.mark.parametrize("recipe", [{}, {"augment": "strong", "ema_decay": 0.9}], ids=["plain", "strong+ema"])
def test_resume_continues_the_uninterrupted_trajectory(tiny, tmp_path, recipe):
    c = cfg(epochs=3, batch_size=16, threads=1, **recipe)
    training.train_loop(c, tiny, str(tmp_path / "straight"), training.LocalWorld(), keep_checkpoints=0)
    straight = pd.read_csv(tmp_path / "straight" / "metrics.csv")

    # A run killed as it reported epoch 1, whose epoch-2 history row was written but not its checkpoint
    # (the kill fell between the two), then relaunched: it resumes from epoch 1's checkpoint and rewrites
    # epoch 2.
    class Killed(Exception):
        pass

    class KilledAtFirstReport(training.LocalWorld):
        def report(self, metrics, checkpoint=None):
            raise Killed

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        training.train_loop(c, tiny, str(cut), KilledAtFirstReport())
    orphan = straight.iloc[[1]].assign(train_loss=123.0)
    pd.concat([pd.read_csv(cut / "metrics.csv"), orphan]).to_csv(cut / "metrics.csv", index=False)
    # an unfinished checkpoint directory (no meta.json) is not a checkpoint
    os.makedirs(training.checkpoint_uri(str(cut), 2))
    world = training.LocalWorld()
    training.train_loop(c, tiny, str(cut), world, keep_checkpoints=0)
    resumed = pd.read_csv(cut / "metrics.csv")
    assert resumed["epoch"].tolist() == [1, 2, 3] and resumed["started_at_epoch"].tolist() == [0, 1, 1]
    # before training on, the run said its last recorded epoch again (a scheduler may have stopped it on it)
    assert [(r["epoch"], r["started_at_epoch"]) for r in world.reports] == [(1, 1), (2, 1), (3, 1)]
    for column in ("train_loss", "val_loss", "val_auroc", "threshold"):
        np.testing.assert_allclose(resumed[column], straight[column], rtol=0, atol=1e-9)
    # relaunching the finished run trains nothing and reports its last epoch again
    again = training.LocalWorld()
    training.train_loop(c, tiny, str(cut), again)
    assert len(again.reports) == 1 and again.reports[0]["epoch"] == 3 and again.reports[0]["started_at_epoch"] == 3
    pd.testing.assert_frame_equal(pd.read_csv(cut / "metrics.csv"), resumed)


def test_a_run_whose_weights_diverge_records_the_epoch_and_ends_there(tiny, tmp_path):
    """A learning rate far too high overflows the weights: the epoch is recorded as diverged (NaN
    metrics, no crash) and the run ends at it; relaunched, it trains nothing more."""
    c = cfg(epochs=3, batch_size=16, threads=1, lr=1e30, weight_decay=1.0)  # |w| grows 1e30-fold per step
    world = training.LocalWorld()
    training.train_loop(c, tiny, str(tmp_path), world)
    history = pd.read_csv(tmp_path / "metrics.csv")
    assert history["epoch"].tolist() == [1] and [r["epoch"] for r in world.reports] == [1]
    assert history["diverged"].tolist() == [True] and study_layout.diverged(world.reports[0])
    assert history[["val_loss", "val_auroc", "threshold"]].isna().all(axis=None)
    again = training.LocalWorld()
    training.train_loop(c, tiny, str(tmp_path), again)
    assert [r["epoch"] for r in again.reports] == [1] and len(pd.read_csv(tmp_path / "metrics.csv")) == 1
    # the study's record of the trial says so, and its budget counts it
    spec = specs.validate({"name": "d", "data": {"source": "synthetic"}, "arms": ["lcnet_050"],
                           "search_space": {"lr": {"loguniform": [1e-3, 1e-2]}},
                           "budget": {"samples_per_arm": 1, "max_epochs": 3}}, "d.yaml")
    trials = history.assign(phase="search", trial_id="t1", arm="lcnet_050", config_id=0, seed=0, status="ok")
    summary = study.trial_summary(trials, spec, stops={})
    assert summary["outcome"].tolist() == ["diverged at epoch 1"]
    assert study.budget_table(summary, spec)["diverged"].tolist() == [1]
    # a sane run's record says it did not diverge
    training.train_loop(cfg(epochs=1, batch_size=16, threads=1), tiny, str(tmp_path / "sane"), training.LocalWorld())
    assert pd.read_csv(tmp_path / "sane" / "metrics.csv")["diverged"].tolist() == [False]
