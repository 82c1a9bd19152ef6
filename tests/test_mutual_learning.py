"""Mutual learning: VESSA's mask decoder fine-tuned on the EMA teacher's confident pseudo-labels."""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vessa_components.engines import VessaPseudoLabeler

from .test_vessa_in_loop import SIZE, _acdc_workflow, _slices, datalist, foundation_ckpt, segmenter  # noqa: F401

DECODER = "sam2.sam_mask_decoder."


def _labeler(segmenter, **kwargs) -> VessaPseudoLabeler:
    """A labeler with mutual learning on a private copy of the module-scoped segmenter (a step changes its decoder)."""
    return VessaPseudoLabeler(copy.deepcopy(segmenter), refresh_interval=100, mutual_learning=True, **kwargs)


def _teacher(n: int, confidence: float = 0.98) -> torch.Tensor:
    """``[n, 4, SIZE, SIZE]`` teacher probabilities: background everywhere but an LV square, ``confidence`` sure."""
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    labels[:, 20:40, 20:40] = 3
    other = (1.0 - confidence) / 3
    return torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float() * (confidence - other) + other


def _fill_cache(labeler: VessaPseudoLabeler, key: str = "cached") -> None:
    labeler._cache[key] = (0, False, torch.zeros(SIZE, SIZE, dtype=torch.uint8), torch.zeros(SIZE, SIZE))


def _state(labeler: VessaPseudoLabeler) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in labeler.segmenter.model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_a_step_changes_the_mask_decoder_only_and_empties_the_cache(datalist, segmenter, monkeypatch):
    labeler = _labeler(segmenter, feedback_start=10)
    _, images = _slices(datalist, [30])
    _fill_cache(labeler)
    before = _state(labeler)
    prompted = []
    class_logits = labeler.segmenter.class_logits
    monkeypatch.setattr(
        labeler.segmenter, "class_logits", lambda x, m, b: prompted.append(m is not None) or class_logits(x, m, b)
    )

    result = labeler.learn_from_teacher(images, _teacher(1), iteration=5)
    assert prompted == [False]  # feedback prompts follow feedback_active: none before feedback_start

    changed = _changed(before, _state(labeler))
    assert changed and all(k.startswith(DECODER) for k in changed)  # image encoder, memory, prompter: untouched
    assert any(k.startswith(DECODER + "transformer.") for k in changed)
    assert math.isfinite(result["loss_ml"]) and result["loss_ml"] > 0 and result["kept_share"] == 1.0
    assert labeler.mutual_learning_steps == 1
    assert not any(p.requires_grad for p in labeler.segmenter.parameters())  # frozen again outside the step
    assert len(labeler) == 0 and not labeler._is_fresh("cached", 1)  # stale pseudo-labels dropped
    labeler.learn_from_teacher(images, _teacher(1), iteration=10)
    assert prompted == [False, True]


def test_pixels_below_the_confidence_threshold_do_not_count(datalist, segmenter):
    _, images = _slices(datalist, [30])
    unsure = _labeler(segmenter, mutual_learning_conf_thresh=0.95)
    before = _state(unsure)
    _fill_cache(unsure)
    result = unsure.learn_from_teacher(images, _teacher(1, confidence=0.9))
    assert result == {"loss_ml": 0.0, "kept_share": 0.0}
    assert not _changed(before, _state(unsure)) and len(unsure) == 1 and unsure.mutual_learning_steps == 0

    # two teachers that differ only where they are unsure (a sure RV square vs. an unsure one): the same step
    sure = _teacher(1)
    other = sure.clone()
    other[:, :, 0:16, 0:16] = torch.tensor([0.1, 0.6, 0.2, 0.1]).view(1, 4, 1, 1)  # RV, confidence 0.6 < 0.95
    sure[:, :, 0:16, 0:16] = torch.tensor([0.5, 0.1, 0.3, 0.1]).view(1, 4, 1, 1)  # background, 0.5 < 0.95
    first, second = _labeler(segmenter), _labeler(segmenter)
    out1, out2 = first.learn_from_teacher(images, sure), second.learn_from_teacher(images, other)
    assert out1["kept_share"] == out2["kept_share"] == pytest.approx(1 - 256 / SIZE**2)
    assert out1["loss_ml"] == pytest.approx(out2["loss_ml"], rel=1e-6)
    after1, after2 = _state(first), _state(second)
    assert all(torch.allclose(after1[k], after2[k], atol=1e-7) for k in after1)
    # while a confident change of those pixels does change the step
    third = _labeler(segmenter)
    confident = _teacher(1)
    confident[:, :, 0:16, 0:16] = torch.tensor([0.01, 0.97, 0.01, 0.01]).view(1, 4, 1, 1)
    assert third.learn_from_teacher(images, confident)["loss_ml"] != pytest.approx(out1["loss_ml"], rel=1e-6)


def test_state_dict_restores_the_decoder_and_its_optimiser(datalist, segmenter):
    _, images = _slices(datalist, [3])
    trained = _labeler(segmenter, mutual_learning_lr=1e-3)
    trained.learn_from_teacher(images, _teacher(1))
    saved = copy.deepcopy(trained.state_dict())
    assert saved["optimizer"]["state"] and saved["mutual_learning_steps"] == 1

    resumed = _labeler(segmenter, mutual_learning_lr=1e-3)
    _fill_cache(resumed)
    resumed.load_state_dict(saved)
    assert not _changed(_state(trained), _state(resumed)) and len(resumed) == 0
    assert resumed.mutual_learning_steps == 1
    moments = resumed._optimizer.state_dict()["state"]
    assert moments and all(
        torch.equal(moments[i][name], saved["optimizer"]["state"][i][name]) for i in moments for name in moments[i]
    )
    # the optimiser's moments came back too: the next step is the same as the uninterrupted one's
    trained.learn_from_teacher(images, _teacher(1))
    resumed.learn_from_teacher(images, _teacher(1))
    after_trained, after_resumed = _state(trained), _state(resumed)
    assert all(torch.allclose(after_trained[k], after_resumed[k], atol=1e-7) for k in after_trained)


def test_bad_arguments_are_rejected(segmenter):
    for kwargs, message in [
        ({"mutual_learning_interval": 0}, "mutual_learning_interval must be an integer >= 1"),
        ({"mutual_learning_interval": 2.5}, "mutual_learning_interval must be an integer >= 1"),
        ({"mutual_learning_lr": 0.0}, "mutual_learning_lr must be > 0"),
        ({"mutual_learning_conf_thresh": 1.5}, r"mutual_learning_conf_thresh must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            VessaPseudoLabeler(segmenter, **kwargs)
    plain = torch.nn.Conv2d(1, 4, 1)
    VessaPseudoLabeler(plain)  # any segmenter without mutual learning
    with pytest.raises(ValueError, match="mutual_learning needs a VessaSegmenter"):
        VessaPseudoLabeler(plain, mutual_learning=True)
    labeler = _labeler(segmenter)
    with pytest.raises(ValueError, match="teacher_probs"):
        labeler.learn_from_teacher(torch.rand(2, 1, SIZE, SIZE), _teacher(1))
    assert [labeler.mutual_learning_due(i) for i in (0, 1, 49, 50, 100)] == [False, False, False, True, True]
    assert not VessaPseudoLabeler(segmenter, mutual_learning_interval=1).mutual_learning_due(50)  # off by default


def test_bundle_fine_tunes_vessa_logs_loss_ml_and_resumes_it(tmp_path, acdc_root, foundation_ckpt):
    from ignite.engine import Events

    from .helpers import copy_acdc_subset

    data = copy_acdc_subset(acdc_root, tmp_path / "acdc", ("patient099", "patient038"), slice_step=4, n_volumes=1)
    settings = dict(
        vessa_ckpt=str(foundation_ckpt), max_iterations=1, val_interval=1, save_interval=1, feedback_start=1,
        mutual_learning=True, mutual_learning_interval=1, mutual_learning_conf_thresh=0.0, mutual_learning_lr=1e-3,
        pool_quality_interval=100, pool_quality_slices=1,
    )
    workflow = _acdc_workflow(tmp_path / "run", data, **settings)
    labeler = workflow.parser.get_parsed_content("train#vessa_labeler")
    assert labeler.mutual_learning and labeler.mutual_learning_interval == 1 and labeler.mutual_learning_lr == 1e-3
    foundation = _state(labeler)
    seen = []
    workflow.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(float(e.state.output[0].get("loss_ml", math.nan)))
    )
    workflow.run()
    assert len(seen) == 1 and math.isfinite(seen[0]) and seen[0] > 0
    tuned = _state(labeler)
    assert _changed(foundation, tuned) and all(k.startswith(DECODER) for k in _changed(foundation, tuned))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "logs")).Reload()
    assert "loss_ml" in events.Tags()["scalars"]
    workflow.finalize()

    resumed = _acdc_workflow(tmp_path / "run", data, resume=True, **settings)
    restored = resumed.parser.get_parsed_content("train#vessa_labeler")
    resumed.run()  # loads the checkpoint of iteration 1: nothing left to train
    assert not _changed(tuned, _state(restored)) and restored.mutual_learning_steps == 1
    resumed.finalize()


@pytest.mark.slow
def test_two_torchrun_processes_take_the_same_step(tmp_path, acdc_root):
    """Real gloo processes: rank 1's teacher is never confident, yet both ranks step together and stay identical
    (without the gradient all-reduce rank 1 would keep the old decoder, or hang waiting for rank 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    script = Path(__file__).with_name("ddp_mutual_learning.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port,
           str(script), str(acdc_root), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["before"], ranks[1]["before"])
    assert not torch.equal(ranks[0]["before"], ranks[0]["after"])  # the step happened
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])  # and it was the same step on both ranks
    assert ranks[0]["result"]["loss_ml"] > 0 and ranks[1]["result"] == {"loss_ml": 0.0, "kept_share": 0.0}
    assert ranks[0]["steps"] == ranks[1]["steps"] == 1
