"""UniMatch V2 pieces: CutMix boxes and mixing, the EMA teacher, the trainer's iteration and its supervised fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from vessa_components.engines import UniMatchV2Trainer, pseudo_label_loss, unlabeled_data
from vessa_components.handlers import EMATeacher
from vessa_components.networks import UNet
from vessa_components.transforms import RandCutMixBoxd, cutmix_with_flipped_batch


def test_cutmix_pastes_the_flipped_partner_inside_the_box():
    values = torch.arange(3 * 2 * 4 * 4, dtype=torch.float32).reshape(3, 2, 4, 4)
    boxes = torch.zeros(3, 1, 4, 4)
    boxes[0, :, 1:3, 1:3] = 1
    mixed = cutmix_with_flipped_batch(values, boxes)
    assert torch.equal(mixed[0, :, 1:3, 1:3], values[2, :, 1:3, 1:3])  # sample 0's partner is sample 2
    assert torch.equal(mixed[0, :, 0], values[0, :, 0]) and torch.equal(mixed[1:], values[1:])
    labels = values[:, 0].long()
    assert torch.equal(cutmix_with_flipped_batch(labels, boxes)[0, 1:3, 1:3], labels[2, 1:3, 1:3])


def test_cutmix_boxes_area_probability_and_seed():
    data = {"image": torch.zeros(1, 64, 48)}
    always = RandCutMixBoxd(["box1", "box2"], prob=1.0).set_random_state(3)
    areas = []
    for _ in range(50):
        out = always(data)
        assert out["box1"].shape == (1, 64, 48)
        areas.append(float(out["box1"].mean()))
    assert min(areas) > 0.01 and max(areas) <= 0.41
    never = RandCutMixBoxd(["box1"], prob=0.0)
    assert never(data)["box1"].sum() == 0
    a = RandCutMixBoxd(["box1"], prob=1.0).set_random_state(7)(data)["box1"]
    b = RandCutMixBoxd(["box1"], prob=1.0).set_random_state(7)(data)["box1"]
    assert torch.equal(a, b)


def test_ema_warm_up_decay_and_state():
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema = EMATeacher(student, teacher, decay=0.9)
    assert ema.ratio(1) == 0.0 and ema.ratio(2) == 0.5 and ema.ratio(1000) == 0.9
    ema.update(1)  # the first step copies the student
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        assert torch.allclose(p_t, p_s)
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(1000)
    for p_b, p_t, p_s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(p_t, 0.9 * p_b + 0.1 * p_s)
    assert not any(p.requires_grad for p in teacher.parameters())
    restored = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in restored.parameters():
            p.zero_()
    EMATeacher(student, restored).load_state_dict(ema.state_dict())
    for p_r, p_t in zip(restored.parameters(), teacher.parameters()):
        assert torch.equal(p_r, p_t)
    with pytest.raises(ValueError, match="do not match"):
        EMATeacher(student, torch.nn.Linear(3, 3))


def _loaders(n=4, size=32, batch=2):
    g = torch.Generator().manual_seed(0)
    labeled = [
        {"image": torch.rand(1, size, size, generator=g), "label": torch.randint(0, 4, (1, size, size), generator=g)}
        for _ in range(n)
    ]
    unlabeled = []
    for _ in range(n):
        image = torch.rand(1, size, size, generator=g)
        box = torch.zeros(1, size, size)
        box[:, 4:12, 4:12] = 1
        unlabeled.append(
            {"image": image, "image_s1": image * 0.5, "image_s2": image * 1.5, "cutmix_box1": box, "cutmix_box2": box}
        )
    return DataLoader(labeled, batch_size=batch), DataLoader(unlabeled, batch_size=batch)


def _trainer(unlabeled=True, conf_thresh=0.95, iterations=3):
    torch.manual_seed(0)
    student = UNet(in_channels=1, out_channels=4)
    teacher = copy.deepcopy(student)
    labeled_loader, unlabeled_loader = _loaders()
    from monai.losses import DiceCELoss

    trainer = UniMatchV2Trainer(
        device="cpu",
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=labeled_loader,
        unlabeled_data_loader=unlabeled_loader if unlabeled else None,
        network=student,
        teacher=teacher,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.01),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        conf_thresh=conf_thresh,
        train_handlers=[EMATeacher(student, teacher, decay=0.99)],
    )
    return trainer, student, teacher


def test_trainer_outputs_and_teacher_follows_student():
    trainer, student, teacher = _trainer(iterations=3)
    trainer.run()
    out = trainer.state.output
    assert trainer.state.iteration == 3
    assert {"loss", "loss_x", "loss_u", "mask_ratio"} <= set(out)
    assert torch.isfinite(out["loss"]) and 0.0 <= float(out["mask_ratio"]) <= 1.0
    assert torch.allclose(out["loss"], (out["loss_x"] + out["loss_u"]) / 2)
    assert all(p.grad is None for p in teacher.parameters())
    # after a few EMA steps the teacher is neither the initial weights nor the student
    assert any(not torch.equal(p_t, p_s) for p_t, p_s in zip(teacher.parameters(), student.parameters()))


def test_no_confident_pixel_gives_zero_unsupervised_loss():
    trainer, _, _ = _trainer(conf_thresh=1.01, iterations=1)
    trainer.run()
    assert float(trainer.state.output["loss_u"]) == 0.0 and float(trainer.state.output["mask_ratio"]) == 0.0


def test_without_unlabeled_loader_training_is_supervised():
    trainer, _, _ = _trainer(unlabeled=False, iterations=2)
    trainer.run()
    assert "loss_u" not in trainer.state.output
    assert torch.allclose(trainer.state.output["loss"], trainer.state.output["loss_x"])


def test_unsupervised_loss_masks_unconfident_pixels():
    trainer, _, _ = _trainer(iterations=1)
    logits = torch.zeros(1, 4, 2, 2)
    pseudo = torch.zeros(1, 2, 2, dtype=torch.long)
    confidence = torch.tensor([[[0.99, 0.5], [0.5, 0.5]]])
    # CE of uniform logits is log(4) on the one confident pixel, averaged over all four pixels
    expected = torch.log(torch.tensor(4.0)) / 4
    keep = confidence >= trainer.conf_thresh
    assert torch.allclose(trainer.unsupervised_loss(logits, pseudo, keep), expected)


def test_dice_pseudo_label_loss_ignores_unkept_pixels_and_weighs_classes_equally():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    pseudo = torch.randint(0, 4, (2, 8, 8))
    keep = torch.rand(2, 8, 8) > 0.5
    loss = pseudo_label_loss(logits, pseudo, keep, "dice")
    # what the unkept pixels predict or are labelled does not matter
    changed_logits, changed_pseudo = logits.clone(), pseudo.clone()
    changed_logits[~keep.unsqueeze(1).expand_as(logits)] = 9.0
    changed_pseudo[~keep] = 3
    assert torch.allclose(pseudo_label_loss(changed_logits, changed_pseudo, keep, "dice"), loss)
    # a perfect prediction on the kept pixels gives ~0, however few pixels a class has there
    perfect = 50.0 * torch.nn.functional.one_hot(pseudo, 4).permute(0, 3, 1, 2).float()
    assert float(pseudo_label_loss(perfect, pseudo, keep, "dice")) < 1e-4
    assert float(pseudo_label_loss(logits, pseudo, torch.zeros_like(keep), "dice")) == 0.0
    # missing one small class costs 1/4 of the Dice loss but only its pixel share of the CE
    small = torch.zeros(1, 8, 8, dtype=torch.long)
    small[0, :2, :2] = 2
    miss_small = 50.0 * torch.nn.functional.one_hot(torch.zeros_like(small), 4).permute(0, 3, 1, 2).float()
    everywhere = torch.ones_like(small, dtype=torch.bool)
    assert float(pseudo_label_loss(miss_small, small, everywhere, "dice")) > 0.25
    assert float(pseudo_label_loss(miss_small, small, everywhere, "ce")) < 50.0 * 4 / 64 + 1e-3
    with pytest.raises(ValueError, match="unknown unlabeled_loss 'focal'"):
        pseudo_label_loss(logits, pseudo, keep, "focal")


def test_trainer_with_dice_unlabeled_loss_trains():
    trainer, student, _ = _trainer(iterations=2)
    trainer.unlabeled_loss = "dice"
    trainer.run()
    out = trainer.state.output
    assert torch.isfinite(out["loss"]) and 0.0 <= float(out["loss_u"]) <= 1.0


def test_pseudo_labels_from_the_student_keep_the_teacher_statistics_its_own():
    trainer, student, teacher = _trainer(iterations=1)
    trainer.pseudo_labels_from, trainer.teacher_bn_stats = "student", "own"
    for p in teacher.parameters():  # a teacher that disagrees with the student
        p.data.normal_()
    for module in student.modules():  # dropout off, so two train-mode passes agree
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    images = torch.randn(2, 1, 32, 32)
    before = [b.clone() for b in teacher.buffers()]
    confidence, label = trainer.pseudo_label(images)
    assert not teacher.training and all(p.grad is None for p in student.parameters())
    after = [b.clone() for b in teacher.buffers()]
    with torch.no_grad():
        expected_conf, expected_label = student.train()(images).softmax(dim=1).max(dim=1)
        teacher_label = teacher.train()(images).argmax(dim=1)
    assert torch.allclose(confidence, expected_conf, atol=1e-5) and torch.equal(label, expected_label)
    assert not torch.equal(label, teacher_label)
    # validation scores the teacher: its BatchNorm running statistics still follow its own passes
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    for name, value in (("pseudo_labels_from", "oracle"), ("unlabeled_loss", "focal")):
        with pytest.raises(ValueError, match=f"unknown {name} '{value}'"):
            UniMatchV2Trainer(
                device="cpu", max_epochs=1, train_data_loader=[], network=student, teacher=teacher,
                optimizer=torch.optim.SGD(student.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
                **{name: value},
            )


def test_method_choice_and_empty_pool():
    assert unlabeled_data("supervised", [{"image": "a"}]) == []
    assert unlabeled_data("unimatch_v2", [{"image": "a"}]) == [{"image": "a", "id": "a"}]
    with pytest.warns(UserWarning, match="unlabelled pool is empty"):
        assert unlabeled_data("unimatch_v2", []) == []
    with pytest.raises(ValueError, match="unknown method 'fixmatch'"):
        unlabeled_data("fixmatch", [])
    with pytest.raises(ValueError, match="needs a teacher"):
        UniMatchV2Trainer(
            device="cpu", max_epochs=1, train_data_loader=[], unlabeled_data_loader=[], network=torch.nn.Conv2d(1, 4, 1),
            optimizer=torch.optim.SGD(torch.nn.Conv2d(1, 4, 1).parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
        )


def test_trainer_step_equals_the_bare_pytorch_step():
    """The bundle's trainer and the benchmark's bare loop compute the same UniMatch V2 step (same loss, same weights)."""
    from monai.losses import DiceCELoss

    from vessa_components.reporting.benchmark import bare_unimatch_v2_step

    labeled_loader, unlabeled_loader = _loaders(n=2, batch=2)
    labeled, unlabeled = next(iter(labeled_loader)), next(iter(unlabeled_loader))
    torch.manual_seed(0)
    base = UNet(in_channels=1, out_channels=4)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)

    student_a, teacher_a = copy.deepcopy(base), copy.deepcopy(base)
    optimizer_a = torch.optim.SGD(student_a.parameters(), lr=0.1)
    torch.manual_seed(1)
    loss_a = bare_unimatch_v2_step(student_a, teacher_a, optimizer_a, loss_function, labeled, unlabeled, 0.5, 0.99, 0)

    student_b, teacher_b = copy.deepcopy(base), copy.deepcopy(base)
    trainer = UniMatchV2Trainer(
        device="cpu", max_epochs=1, epoch_length=1, train_data_loader=[labeled], unlabeled_data_loader=[unlabeled],
        network=student_b, teacher=teacher_b, optimizer=torch.optim.SGD(student_b.parameters(), lr=0.1),
        loss_function=loss_function, conf_thresh=0.5, train_handlers=[EMATeacher(student_b, teacher_b, decay=0.99)],
    )
    torch.manual_seed(1)
    trainer.run()
    assert float(trainer.state.output["loss"]) == pytest.approx(loss_a, rel=1e-5)
    for p_a, p_b in zip(student_a.parameters(), student_b.parameters()):
        assert torch.allclose(p_a, p_b, atol=1e-6)
    for p_a, p_b in zip(teacher_a.parameters(), teacher_b.parameters()):
        assert torch.allclose(p_a, p_b, atol=1e-6)


def test_strong_pass_leaves_batchnorm_running_stats_alone():
    from vessa_components.engines import frozen_batchnorm_stats

    net = UNet(in_channels=1, out_channels=4).train()
    before = {n: b.clone() for n, b in net.named_buffers() if "running" in n}
    with frozen_batchnorm_stats(net):
        net(torch.rand(4, 1, 32, 32) * 3, comp_drop=True)
    assert all(torch.equal(b, before[n]) for n, b in net.named_buffers() if "running" in n)
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(torch.rand(2, 1, 32, 32))
    assert any(not torch.equal(b, before[n]) for n, b in net.named_buffers() if "running" in n)


@pytest.mark.parametrize("unlabeled", [True, False])
def test_teacher_own_batchnorm_statistics(unlabeled):
    """With teacher_bn_stats="own" the EMA moves only the teacher's weights; its running statistics follow its own
    forward passes (weak view, or the labelled batch in supervised training), never the student's."""
    torch.manual_seed(0)
    student = UNet(in_channels=1, out_channels=4)
    teacher = copy.deepcopy(student)
    labeled_loader, unlabeled_loader = _loaders()
    from monai.losses import DiceCELoss

    trainer = UniMatchV2Trainer(
        device="cpu", max_epochs=1, epoch_length=2, train_data_loader=labeled_loader,
        unlabeled_data_loader=unlabeled_loader if unlabeled else None, network=student, teacher=teacher,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.01), loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        teacher_bn_stats="own", train_handlers=[EMATeacher(student, teacher, decay=0.99, average_buffers=False)],
    )
    bn_t = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_s = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    initial = bn_t.running_mean.clone()
    trainer.run()
    assert int(bn_t.num_batches_tracked) == 2  # one teacher pass per iteration
    assert not torch.allclose(bn_t.running_mean, initial)
    if unlabeled:  # statistics of the weak view, not of the student's labelled batches
        assert not torch.allclose(bn_t.running_mean, bn_s.running_mean)
    assert not teacher.training
    with pytest.raises(ValueError, match="unknown teacher_bn_stats 'swa'"):
        UniMatchV2Trainer(
            device="cpu", max_epochs=1, train_data_loader=[], network=student, teacher=teacher,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(), teacher_bn_stats="swa",
        )


def test_labelled_loader_without_a_batch_is_an_error():
    """MONAI Label may send fewer labelled volumes than batch_size: say so instead of training 0 iterations."""
    loader = DataLoader([{"image": torch.zeros(1, 8, 8), "label": torch.zeros(1, 8, 8)}] * 3, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="3 labelled samples for batch_size 4"):
        UniMatchV2Trainer(
            device="cpu", max_epochs=1, train_data_loader=loader, network=torch.nn.Conv2d(1, 4, 1),
            optimizer=torch.optim.SGD(torch.nn.Conv2d(1, 4, 1).parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
        )
