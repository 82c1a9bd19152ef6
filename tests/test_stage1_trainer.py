"""VESSA's Stage-1 trainer on tiny random SAM2 / Qwen3-VL parts: learning, gradients, template pairing, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Events

from vessa_components.data import DataError
from vessa_components.data.stage1 import foreground_class_names, resolve_datasets
from vessa_components.engines import VessaStage1Trainer, simulated_feedback
from vessa_components.losses import VessaMaskLoss
from vessa_components.networks import Qwen3VLPrompter, VessaSegmenter, build_vessa_model
from vessa_components.templates import TemplateBank

from .helpers import copy_acdc_subset

SIZE = 64
ACDC = ["background", "right_ventricle", "myocardium", "left_ventricle"]
CT = ["background", "liver"]


def _slice(seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright ring-in-square phantom whose label values 1..classes sit at a random place."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    c = int(torch.randint(22, 42, (1,), generator=g))
    label[0, c - 12 : c + 12, c - 12 : c + 12] = min(2, classes)
    label[0, c - 7 : c + 7, c - 7 : c + 7] = classes
    if classes >= 3:
        label[0, c - 12 : c - 4, c + 13 : c + 20] = 1
    image = (torch.rand(1, SIZE, SIZE, generator=g) * 0.3 + 0.5 * (label > 0)).clamp(0, 1)
    return image, label


def _bank(patients=("p1", "p1", "p2", "p3"), with_ct: bool = False) -> TemplateBank:
    bank = TemplateBank(SIZE)
    bank.add_dataset("acdc", "MRI", ACDC)
    for i, patient in enumerate(patients):
        bank.add(*_slice(i), "acdc", patient, name=f"{patient}_slice_{i}")
    if with_ct:
        bank.add_dataset("ct", "CT", CT)
        for i, patient in enumerate(("c1", "c2")):
            bank.add(*_slice(10 + i, classes=1), "ct", patient)
    return bank


def _batch(seeds=(0, 2), patients=("p1", "p2")) -> dict:
    images, labels = zip(*(_slice(s) for s in seeds))
    return {"image": torch.stack(images), "label": torch.stack(labels), "patient": list(patients),
            "dataset": ["acdc"] * len(seeds)}


def _train(model, bank, batches, iterations, lr=1e-3, **kwargs):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr)
    trainer = VessaStage1Trainer("cpu", iterations, batches, model, optimizer, bank, **kwargs)
    outputs = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: outputs.append({k: e.state.output[k].detach().clone() for k in ("loss", "loss_bce", "loss_dice", "loss_ce", "prompted")}),
    )
    trainer.run()
    return trainer, outputs


def test_frozen_vlm_learns_a_fixed_batch_and_gradients_skip_the_vlm():
    torch.manual_seed(0)
    model = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm="frozen")
    vlm_before = {k: v.clone() for k, v in model.prompter.vlm.state_dict().items()}
    decoder_before = model.sam2.sam_mask_decoder.output_upscaling[0].weight.clone()
    _, outputs = _train(model, _bank(), [_batch()], iterations=10)
    losses = [float(o["loss"]) for o in outputs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.85 * losses[0]
    last = outputs[-1]
    # a frozen VLM's answer loss is reported but not trained on
    assert float(last["loss_ce"]) > 0
    assert float(last["loss"]) == pytest.approx(2.0 * float(last["loss_bce"]) + 0.5 * float(last["loss_dice"]), rel=1e-5)
    assert all(torch.equal(v, vlm_before[k]) for k, v in model.prompter.vlm.state_dict().items())
    assert not torch.equal(model.sam2.sam_mask_decoder.output_upscaling[0].weight, decoder_before)
    # the gate opened, so the <SEG> MLP trains too
    assert model.prompter.vlm_gate.item() != 0
    assert all(float(p.grad.abs().sum()) > 0 for p in model.prompter.text_hidden_fcs.parameters())
    assert any(p.grad is not None for p in model.sam2.memory_attention.parameters())


def test_lora_adds_the_answer_loss_and_trains_only_adapters():
    torch.manual_seed(0)
    model = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm="lora")
    _, outputs = _train(model, _bank(), [_batch()], iterations=2)
    last = outputs[-1]
    expected = 2.0 * last["loss_bce"] + 0.5 * last["loss_dice"] + 1.0 * last["loss_ce"]
    assert float(last["loss"]) == pytest.approx(float(expected), rel=1e-5)
    named = dict(model.prompter.vlm.named_parameters())
    lora = [p for n, p in named.items() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n)


def test_simulated_feedback_corrupts_the_target_within_its_bounds():
    targets = torch.zeros(40, 1, SIZE, SIZE)
    targets[:, :, 20:40, 24:36] = 1.0
    torch.manual_seed(0)
    probs, masks = simulated_feedback(targets)
    assert probs.shape == masks.shape == targets.shape and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert ((probs > 0.5) == (masks > 0.5)).all() and ((probs >= 0.01 - 1e-6) & (probs <= 0.99 + 1e-6)).all()
    missing = masks.flatten(1).sum(1) == 0
    assert 0 < int(missing.sum()) < 20  # about a fifth of the students miss the class
    seen = masks[~missing]
    assert not torch.equal(seen, targets[~missing])  # the others are shifted, grown or shrunk ...
    # ... by at most 8 pixels of shift and 3 of growth: the box stays within those margins of the target's
    rows, cols = seen[:, 0].amax(2) > 0, seen[:, 0].amax(1) > 0
    top = rows.float().argmax(1)
    left = cols.float().argmax(1)
    assert ((top >= 20 - 11) & (top <= 20 + 11)).all() and ((left >= 24 - 11) & (left <= 24 + 11)).all()
    exact_probs, exact = simulated_feedback(targets, miss_prob=0.0, max_shift=0, max_radius=0)
    assert torch.equal(exact, targets) and (exact_probs[targets > 0] >= 0.6).all()


def test_feedback_prompts_train_the_prompt_encoders_only_when_asked():
    torch.manual_seed(0)
    model = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm="off")
    mask_encoder = model.sam2.sam_prompt_encoder.mask_downscaling
    _, outputs = _train(model, _bank(), [_batch()], iterations=1)
    assert float(outputs[0]["prompted"]) == 0.0 and all(p.grad is None for p in mask_encoder.parameters())
    _, outputs = _train(model, _bank(), [_batch()], iterations=2, feedback_prompt_prob=1.0)
    assert [float(o["prompted"]) for o in outputs] == [1.0, 1.0]
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in mask_encoder.parameters())
    box_corners = model.sam2.sam_prompt_encoder.point_embeddings[2].weight  # SAM's top-left box corner embedding
    assert box_corners.grad is not None and float(box_corners.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="feedback_prompt_prob"):
        _train(model, _bank(), [_batch()], iterations=1, feedback_prompt_prob=1.5)


def test_vlm_off_has_no_answer_loss():
    model = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm="off")
    _, outputs = _train(model, _bank(), [_batch()], iterations=1)
    assert float(outputs[0]["loss_ce"]) == 0.0 and torch.isfinite(outputs[0]["loss"])


def test_templates_come_from_another_patient_of_the_same_dataset():
    bank = _bank(with_ct=True)
    model = build_vessa_model(foreground_class_names([{"class_names": ACDC}, {"class_names": CT}]), image_size=SIZE,
                              train_vlm="off")
    trainer = VessaStage1Trainer("cpu", 1, [], model, torch.optim.SGD(model.parameters(), 0.1), bank)
    image_a, label_a = _slice(0)
    image_c, label_c = _slice(10, classes=1)
    pairs = trainer.make_pairs(torch.stack([image_a, image_c]), torch.stack([label_a, label_c]), ["p1", "c1"],
                               ["acdc", "ct"])
    assert pairs["class_indices"].tolist() == [0, 1, 2, 3]  # three ACDC classes, then liver
    assert pairs["modalities"] == ["MRI", "MRI", "MRI", "CT"]
    exemplars = {i: bank.exemplars[i] for i in range(len(bank))}
    for row, template in enumerate(pairs["template_images"]):
        source = next(i for i in exemplars if torch.equal(bank.images[i], template))
        assert exemplars[source].patient not in ("p1", "c1")
        assert exemplars[source].dataset == ("ct" if row == 3 else "acdc")
    assert torch.equal(pairs["targets"][3], (label_c == 1).float())
    assert torch.equal(pairs["targets"][1], (label_a == 2).float())


def test_one_labelled_patient_draws_templates_from_its_other_slices():
    bank = _bank(patients=("p1", "p1", "p1"))
    model = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm="off")
    trainer = VessaStage1Trainer("cpu", 1, [], model, torch.optim.SGD(model.parameters(), 0.1), bank)
    image, label = _slice(0)  # exemplar 0 itself: the best match were it allowed
    pairs = trainer.make_pairs(image[None], label[None], ["p1"], ["acdc"], names=["p1_slice_0"])
    for template in pairs["template_images"]:
        assert not torch.equal(template, bank.images[0])
        assert any(torch.equal(template, bank.images[i]) for i in (1, 2))
    with pytest.raises(KeyError, match="'name' key"):
        trainer.make_pairs(image[None], label[None], ["p1"], ["acdc"])
    with pytest.raises(ValueError, match="apart from slice 'p1_slice_0'"):
        _bank(patients=("p1",)).match_batch(image[None], "left_ventricle", exclude_name="p1_slice_0")


def test_bad_input_is_named():
    model = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm="off")
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    # the only other patient's exemplars lack the left ventricle
    bank = TemplateBank(SIZE)
    bank.add_dataset("acdc", "MRI", ACDC)
    bank.add(*_slice(0), "acdc", "p1")
    image, label = _slice(1)
    bank.add(image, label.clamp(max=2), "acdc", "p2")
    trainer = VessaStage1Trainer("cpu", 1, [_batch((0,), ("p1",))], model, optimizer, bank)
    with pytest.raises(ValueError, match="no exemplar shows class 'left_ventricle' in data set 'acdc' apart from patient 'p1'"):
        trainer.make_pairs(*[_batch((0,), ("p1",))[k] for k in ("image", "label", "patient", "dataset")])
    trainer = VessaStage1Trainer("cpu", 1, [], model, optimizer, _bank())
    with pytest.raises(ValueError, match="unknown data set 'prostate'"):
        trainer.make_pairs(_slice(0)[0][None], _slice(0)[1][None], ["p1"], ["prostate"])
    with pytest.raises(ValueError, match="not among the model's classes"):
        VessaSegmenter(build_vessa_model(["liver"], image_size=SIZE, train_vlm="off"), _bank())
    with pytest.raises(ValueError, match="unknown class 'liver'"):
        _bank().match(_slice(0)[0], "liver")
    with pytest.raises(TypeError, match="trains a VessaModel"):
        VessaStage1Trainer("cpu", 1, [], torch.nn.Linear(1, 1), optimizer, _bank())
    with pytest.raises(ValueError, match="non-negative"):
        VessaMaskLoss(w_bce=-1.0)


def test_pretrained_frozen_vlm_is_left_out_of_the_weights(tmp_path):
    Qwen3VLPrompter(train_vlm="frozen").save_pretrained(tmp_path / "vlm")
    for mode in ("frozen", "lora"):
        model = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm=mode, vlm_path=tmp_path / "vlm")
        state = model.state_dict()
        vlm_keys = [k for k in state if k.startswith("prompter.vlm.")]
        assert all("lora_" in k for k in vlm_keys) and (mode == "frozen") == (not vlm_keys)
        assert "prompter.text_hidden_fcs.0.weight" in state and "sam2.sam_mask_decoder.iou_token.weight" in state
        fresh = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm=mode, vlm_path=tmp_path / "vlm")
        fresh.load_state_dict(state)  # strict: only the checkpoint's own frozen weights may be missing
        with pytest.raises(RuntimeError, match="text_hidden_fcs"):
            fresh.load_state_dict({k: v for k, v in state.items() if "text_hidden_fcs" not in k})
    random_vlm = build_vessa_model(ACDC[1:], image_size=SIZE, train_vlm="frozen")
    assert any(k.startswith("prompter.vlm.") for k in random_vlm.state_dict())  # nothing else could restore it


def test_resolve_datasets_from_datalists_folders_and_mappings(tmp_path, acdc_root):
    root = copy_acdc_subset(acdc_root, tmp_path / "acdc", ("patient099", "patient038"), slice_step=4, n_volumes=1)
    from vessa_components.data import make_slice_datalist

    datalist = make_slice_datalist(root, labeled_cases=1)
    renamed = ["background", "right_ventricle", "myocardium", "liver"]  # same label values, other class names
    (tmp_path / "ct.json").write_text(json.dumps({"name": "ct", "modality": "CT", "class_names": renamed,
                                                  "labeled": datalist["labeled"][:2]}))
    sets = resolve_datasets([str(root), str(tmp_path / "ct.json"), {"name": "mri2", "root": str(root), "labeled_cases": 2}],
                            labeled_cases=1)
    assert [s["name"] for s in sets] == ["acdc", "ct", "mri2"]
    assert {e["patient"] for e in sets[0]["labeled"]} == {"patient099"} and sets[0]["modality"] == "MRI"
    assert len(sets[2]["labeled"]) > len(sets[0]["labeled"]) and sets[1]["validation"] == []
    assert sets[1]["class_names"] == renamed and all(e["dataset"] == "ct" for e in sets[1]["labeled"])
    assert foreground_class_names(sets) == ACDC[1:] + ["liver"]
    bank = TemplateBank.from_datasets(sets[:2], image_size=SIZE)
    assert bank.datasets() == ["acdc", "ct"] and bank.foreground_classes() == ACDC[1:] + ["liver"]
    with pytest.raises(ValueError, match="several datasets are named"):
        resolve_datasets([str(root), str(root)], labeled_cases=1)
    with pytest.raises(DataError, match="datalist not found"):
        resolve_datasets([{"datalist": str(tmp_path / "missing.json")}])
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_datasets([{"root": str(root), "classes": CT}])
