"""PseudoLabelQuality: VESSA's and the teacher's pooled Dice on the unlabelled pool's hidden labels during Stage 2."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from vessa_components.data import ACDC_CLASS_NAMES
from vessa_components.data.errors import DataError
from vessa_components.handlers import PseudoLabelQuality
from vessa_components.handlers.pseudo_label_quality import pool_subset, pooled_dice

SIDE = 24
NUM_CLASSES = len(ACDC_CLASS_NAMES)


def _write_slice(path: Path, label: np.ndarray | None, image: np.ndarray | None = None) -> dict:
    """An SSL4MIS-style slice file; the image encodes the label (``label / 3``) so a fake labeler can read it back."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=(label / 3.0 if image is None else image).astype(np.float32))
        if label is not None:
            f.create_dataset("label", data=label.astype(np.uint8))
    return {"image": str(path)}


@pytest.fixture
def pool(tmp_path) -> list[dict]:
    """Eight slices with RV (1) and LV (3) and no myocardium (2): class 2's Dice is undefined."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(8):
        label = np.zeros((SIDE, SIDE), np.uint8)
        r, c = rng.integers(2, 10, size=2)
        label[r : r + 6, c : c + 8] = 1
        label[14:20, 12 : 16 + i % 4] = 3
        entries.append(_write_slice(tmp_path / f"patient{i:03d}_frame01_slice_1.h5", label))
    return entries


class FakeLabeler:
    """``predict`` gives the one-hot label decoded from the image (``truth``) or confident-ish background."""

    def __init__(self, mode: str = "truth", feedback_start: int | None = None) -> None:
        self.mode, self.feedback_start = mode, feedback_start
        self.prompts: list[torch.Tensor | None] = []

    def feedback_active(self, iteration: int) -> bool:
        return self.feedback_start is not None and iteration >= self.feedback_start

    def predict(self, images: torch.Tensor, teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
        self.prompts.append(teacher_probs)
        if self.mode == "truth":
            label = (images[:, 0] * 3.0).round().long()
            return F.one_hot(label, NUM_CLASSES).permute(0, 3, 1, 2).float()
        probs = torch.full((images.shape[0], NUM_CLASSES, *images.shape[-2:]), 0.1)
        probs[:, 0] = 0.7
        return probs


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, NUM_CLASSES, 3, padding=1), nn.BatchNorm2d(NUM_CLASSES))
    net.train()
    with torch.no_grad():  # running statistics that eval mode would keep, train mode would move
        net[1].running_mean.fill_(0.3)
        net[1].running_var.fill_(2.0)
    return net


def _run(handler: PseudoLabelQuality, iterations: int, vessa_conf_thresh: float | None = None) -> Engine:
    engine = Engine(lambda e, b: None)
    if vessa_conf_thresh is not None:
        engine.vessa_conf_thresh = vessa_conf_thresh  # what UniMatchV2Trainer carries
    handler.attach(engine)
    engine.run(range(iterations), max_epochs=1)
    return engine


def test_perfect_labeler_scores_one_and_records_every_interval_plus_the_end(tmp_path, pool):
    teacher = _teacher()
    bn_before = {k: v.clone() for k, v in teacher[1].state_dict().items()}
    labeler = FakeLabeler("truth", feedback_start=3)
    out = tmp_path / "run" / "vessa_pool_quality.json"
    handler = PseudoLabelQuality(labeler, teacher, pool, ACDC_CLASS_NAMES, interval=2, output_file=out, image_size=SIDE, batch_size=3)
    engine = _run(handler, 5, vessa_conf_thresh=0.8)

    records = json.loads(out.read_text())
    assert [r["iteration"] for r in records] == [2, 4, 5]  # every 2 iterations, then the end
    assert [r["feedback"] for r in records] == [False, True, True]
    for r in records:
        assert r["num_slices"] == 8 and r["conf_thresh"] == 0.8
        assert r["vessa"]["dice"] == {"right_ventricle": 1.0, "myocardium": None, "left_ventricle": 1.0}
        assert r["vessa"]["mean_dice"] == 1.0
        assert r["vessa"]["kept_share"] == 1.0 and r["vessa"]["kept_accuracy"] == 1.0 and r["vessa"]["kept_mean_dice"] == 1.0
        assert set(r["teacher"]) == {"dice", "mean_dice"} and set(r["teacher"]["dice"]) == set(ACDC_CLASS_NAMES[1:])
    # teacher prompts only once feedback is on: probabilities on the slices' grid, 3 batches of at most 3 slices
    assert [p is None for p in labeler.prompts] == [True] * 3 + [False] * 6
    prompt = labeler.prompts[-1]
    assert prompt.shape == (2, NUM_CLASSES, SIDE, SIDE) and torch.allclose(prompt.sum(1), torch.ones(2, SIDE, SIDE))
    assert engine.state.metrics["vessa_pool_dice"] == 1.0
    assert engine.state.metrics["teacher_pool_dice"] == pytest.approx(records[-1]["teacher"]["mean_dice"], nan_ok=True)
    # the teacher is back in train mode and its BatchNorm statistics did not move
    assert teacher.training
    for k, v in teacher[1].state_dict().items():
        assert torch.equal(v, bn_before[k]), k


def test_background_labeler_scores_zero_and_kept_pixels_follow_the_threshold(tmp_path, pool):
    out = tmp_path / "q.json"
    labels = np.stack([h5py.File(e["image"], "r")["label"][()] for e in pool])
    for thresh, share in ((0.8, 0.0), (0.6, 1.0)):
        handler = PseudoLabelQuality(
            FakeLabeler("background"), _teacher(), pool, ACDC_CLASS_NAMES, interval=10, output_file=out, image_size=SIDE,
        )
        engine = _run(handler, 3, vessa_conf_thresh=thresh)
        (record,) = json.loads(out.read_text())
        out.unlink()
        vessa = record["vessa"]
        assert vessa["dice"] == {"right_ventricle": 0.0, "myocardium": None, "left_ventricle": 0.0}
        assert vessa["mean_dice"] == 0.0 and engine.state.metrics["vessa_pool_dice"] == 0.0
        assert vessa["kept_share"] == share
        if share:
            assert vessa["kept_accuracy"] == pytest.approx(float((labels == 0).mean()))
            assert vessa["kept_mean_dice"] == 0.0
        else:
            assert vessa["kept_accuracy"] is None and vessa["kept_mean_dice"] is None


def test_threshold_argument_wins_and_default_without_engine_attribute(tmp_path, pool):
    handler = PseudoLabelQuality(
        FakeLabeler("background"), _teacher(), pool, ACDC_CLASS_NAMES, interval=1, output_file=tmp_path / "a.json",
        image_size=SIDE, conf_thresh=0.65,
    )
    _run(handler, 1, vessa_conf_thresh=0.99)
    assert json.loads((tmp_path / "a.json").read_text())[0]["vessa"]["kept_share"] == 1.0
    handler = PseudoLabelQuality(
        FakeLabeler("background"), _teacher(), pool, ACDC_CLASS_NAMES, interval=1, output_file=tmp_path / "b.json",
        image_size=SIDE,
    )
    _run(handler, 1)  # a plain Engine has no vessa_conf_thresh: 0.9, the trainer's default
    assert json.loads((tmp_path / "b.json").read_text())[0]["conf_thresh"] == 0.9


def test_subset_is_fixed_spread_and_resized(tmp_path, pool):
    assert pool_subset(5, 32) == [0, 1, 2, 3, 4]
    picks = pool_subset(90, 3, seed=1)
    assert picks == pool_subset(90, 3, seed=1) and [p // 30 for p in picks] == [0, 1, 2]
    shuffled = pool[::-1]  # the choice does not depend on the datalist's order
    make = lambda data: PseudoLabelQuality(  # noqa: E731
        FakeLabeler(), _teacher(), data, ACDC_CLASS_NAMES, interval=1, output_file=tmp_path / "q.json", image_size=16,
        num_slices=3,
    )
    first, second = make(pool), make(shuffled)
    first.load()
    second.load()
    assert first.files == second.files and len(first.files) == 3
    assert first.images.shape == (3, 1, 16, 16) and first.labels.shape == (3, 16, 16)
    assert first.labels.dtype == torch.long and set(first.labels.unique().tolist()) <= {0, 1, 3}


def test_pooled_dice_pools_over_slices():
    label = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]]])
    pred = torch.tensor([[[1, 0, 0, 0]], [[1, 1, 0, 2]]])
    # class 1: 1 overlap, 3 predicted + 2 true -> 2/5 pooled over both slices (a per-slice mean would give (2/3 + 0) / 2); class 2 only predicted -> 0; class 3 absent
    assert pooled_dice(pred, label, 4) == [pytest.approx(2 / 5), 0.0, None]
    mask = torch.tensor([[[True, True, True, True]], [[False, False, False, False]]])
    assert pooled_dice(pred, label, 4, mask) == [pytest.approx(2 / 3), None, None]


def test_pool_without_labels_warns_once_and_writes_nothing(tmp_path):
    data = [_write_slice(tmp_path / f"u{i}.h5", None, np.random.rand(SIDE, SIDE)) for i in range(4)]
    out = tmp_path / "q.json"
    handler = PseudoLabelQuality(FakeLabeler(), _teacher(), data, ACDC_CLASS_NAMES, interval=1, output_file=out, image_size=SIDE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = _run(handler, 3)
    mine = [w for w in caught if "PseudoLabelQuality" in str(w.message)]
    assert len(mine) == 1 and "not measured" in str(mine[0].message)
    assert not handler.active and not out.exists() and "vessa_pool_dice" not in engine.state.metrics


def test_no_labeler_does_nothing(tmp_path):
    data = [{"image": str(tmp_path / "missing.h5")}]  # never read
    out = tmp_path / "q.json"
    handler = PseudoLabelQuality(None, _teacher(), data, ACDC_CLASS_NAMES, interval=1, output_file=out, image_size=SIDE)
    engine = _run(handler, 2)
    assert not handler.active and not out.exists() and not engine.state.metrics


def test_out_of_range_label_names_the_file(tmp_path, pool):
    bad = np.zeros((SIDE, SIDE), np.uint8)
    bad[3:6, 3:6] = 7
    entry = _write_slice(tmp_path / "bad_slice.h5", bad, np.zeros((SIDE, SIDE)))
    handler = PseudoLabelQuality(
        FakeLabeler(), _teacher(), [entry], ACDC_CLASS_NAMES, interval=1, output_file=tmp_path / "q.json", image_size=SIDE
    )
    with pytest.raises(DataError, match=r"bad_slice\.h5: label values 0\.\.7 outside the classes 0\.\.3"):
        handler.attach(Engine(lambda e, b: None))


def test_resumed_run_keeps_earlier_records_and_a_fresh_run_drops_them(tmp_path, pool):
    out = tmp_path / "q.json"
    old = [{"iteration": 2, "old": True}, {"iteration": 4, "old": True}, {"iteration": 6, "old": True}]
    out.write_text(json.dumps(old))
    handler = PseudoLabelQuality(FakeLabeler(), _teacher(), pool, ACDC_CLASS_NAMES, interval=2, output_file=out, image_size=SIDE)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.load_state_dict({"iteration": 4, "epoch_length": 4, "max_epochs": 1})  # what a checkpoint restores
    engine.run(range(4), max_epochs=2)
    records = json.loads(out.read_text())
    assert [(r["iteration"], r.get("old", False)) for r in records] == [(2, True), (4, True), (6, False), (8, False)]
    assert not list(tmp_path.glob(".q.json.*"))  # written through a temporary file, nothing left behind

    out.write_text(json.dumps(old))
    fresh = PseudoLabelQuality(FakeLabeler(), _teacher(), pool, ACDC_CLASS_NAMES, interval=2, output_file=out, image_size=SIDE)
    _run(fresh, 3)
    assert [(r["iteration"], r.get("old", False)) for r in json.loads(out.read_text())] == [(2, False), (3, False)]
