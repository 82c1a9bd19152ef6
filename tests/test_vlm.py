"""Tests of VESSA's Qwen3-VL prompter on the tiny random model: inputs, <SEG> read-out, LM loss, training modes,
saving and loading through the real loading code, and the size of the Qwen3-VL-2B architecture."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from vessa_components.data.errors import DataError
from vessa_components.networks.vlm import LoRALinear, Qwen3VLPrompter, qwen3vl_2b_config
from vessa_components.templates import SEG_TOKEN, build_prompt

TEXTS = [build_prompt("left_ventricle", "MRI"), build_prompt("liver", "CT")]


def _images(seed: int = 0, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=generator), torch.rand(2, 3, size, size, generator=generator)


@pytest.fixture(scope="module")
def prompter() -> Qwen3VLPrompter:
    torch.manual_seed(0)
    return Qwen3VLPrompter().eval()


def test_inputs_have_one_token_per_32_pixels_and_labels_only_on_the_answer(prompter):
    images, overlays = _images()
    inputs = prompter.build_inputs(images, overlays, TEXTS)
    # the tiny processor resizes 128 x 128 to 64 x 64: a 4 x 4 patch grid, merged 2 x 2 into 4 tokens per image
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]] * 4
    image_token_id = prompter.vlm.config.image_token_id
    assert ((inputs["input_ids"] == image_token_id).sum(dim=1) == 8).all()
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == image_token_id)
    for row_ids, row_labels, row_mask in zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]):
        answer = row_labels[row_labels != -100]
        assert prompter.tokenizer.decode(answer) == f"Sure, {SEG_TOKEN}.<|im_end|>"
        assert torch.equal(answer, row_ids[row_mask.bool()][-len(answer) :])  # the answer closes the sequence
        assert (row_ids == prompter.seg_token_id).sum() == 1


def test_max_image_pixels_bounds_the_image_tokens():
    small_budget = Qwen3VLPrompter(max_image_pixels=32 * 32)
    inputs = small_budget.build_inputs(*_images(), TEXTS)
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2]] * 4  # one 32 x 32 token per image
    assert ((inputs["input_ids"] == small_budget.vlm.config.image_token_id).sum(dim=1) == 2).all()


def test_forward_gives_one_prompt_per_sample_and_the_models_own_lm_loss(prompter):
    images, overlays = _images()
    output = prompter(images, overlays, TEXTS)
    assert output.embeddings.shape == (2, 256)
    assert torch.isfinite(output.embeddings).all()
    assert output.lm_loss.ndim == 0 and torch.isfinite(output.lm_loss)
    with torch.no_grad():
        reference = prompter.vlm(**prompter.build_inputs(images, overlays, TEXTS), use_cache=False).loss
    torch.testing.assert_close(output.lm_loss, reference)
    # the two samples differ in text and images, so must their prompts
    assert not torch.allclose(output.embeddings[0], output.embeddings[1])


def test_seg_hidden_state_is_the_final_normed_state_at_the_seg_token(prompter):
    images, overlays = _images()
    captured = []
    handle = prompter.text_hidden_fcs.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    prompter(images, overlays, TEXTS)
    handle.remove()
    inputs = prompter.build_inputs(images, overlays, TEXTS)
    inputs.pop("labels")
    with torch.no_grad():
        # the generation model feeds lm_head with the final (normed) hidden state: capture it there
        seen = []
        hook = prompter.vlm.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        prompter.vlm(**inputs, use_cache=False)
        hook.remove()
    positions = (inputs["input_ids"] == prompter.seg_token_id).int().argmax(dim=1)
    torch.testing.assert_close(captured[0], seen[0][torch.arange(2), positions])


def test_padding_does_not_change_a_samples_prompt(prompter):
    images, overlays = _images()
    small = torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(3))
    # the second sample's smaller images (96 x 160 -> 32 x 64 pixels) give 2 instead of 4 tokens each: it is padded
    batch = prompter([images[0], small], [overlays[0], small], TEXTS)
    first = prompter(images[:1], overlays[:1], TEXTS[:1])
    second = prompter([small], [small], TEXTS[1:])
    torch.testing.assert_close(batch.embeddings, torch.cat([first.embeddings, second.embeddings]), atol=1e-5, rtol=1e-4)


def test_images_must_be_rgb(prompter):
    gray = torch.rand(2, 1, 128, 128)
    with pytest.raises(ValueError, match=r"\(3, H, W\) RGB"):
        prompter(gray, gray, TEXTS)


def test_missing_or_repeated_seg_token_raises(prompter):
    images, overlays = _images()
    with pytest.raises(ValueError, match=r"exactly one <SEG>.*\[2, 2\]"):
        prompter(images, overlays, [f"{text} {SEG_TOKEN}" for text in TEXTS])
    no_seg = Qwen3VLPrompter(answer="Sure.")
    with pytest.raises(ValueError, match=r"exactly one <SEG>.*\[0, 0\]"):
        no_seg(images, overlays, TEXTS)


def test_mismatched_batch_raises(prompter):
    images, overlays = _images()
    with pytest.raises(ValueError, match="one overlay and one text per image"):
        prompter(images, overlays, TEXTS[:1])


def _grad_norms(module: torch.nn.Module) -> dict[str, float | None]:
    return {n: None if p.grad is None else float(p.grad.abs().sum()) for n, p in module.named_parameters()}


def _backward(prompter: Qwen3VLPrompter) -> None:
    images, overlays = _images()
    output = prompter(images, overlays, TEXTS)
    (output.embeddings.square().mean() + output.lm_loss).backward()


def test_frozen_mode_trains_only_the_mlp():
    prompter = Qwen3VLPrompter(train_vlm="frozen")
    _backward(prompter)
    assert all(norm is None for norm in _grad_norms(prompter.vlm).values())
    assert all(norm is not None and norm > 0 for norm in _grad_norms(prompter.text_hidden_fcs).values())


def test_lora_mode_trains_adapters_on_q_and_v_only():
    prompter = Qwen3VLPrompter(train_vlm="lora", lora_rank=4)
    adapted = [name for name, m in prompter.vlm.named_modules() if isinstance(m, LoRALinear)]
    assert sorted(name.rsplit(".", 1)[1] for name in adapted) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    _backward(prompter)
    norms = _grad_norms(prompter.vlm)
    lora = {name: norm for name, norm in norms.items() if ".lora_" in name}
    assert len(lora) == 8 and all(norm is not None for norm in lora.values())
    # B starts at zero, so only B receives a gradient at the first step
    assert all(norm > 0 for name, norm in lora.items() if name.endswith("lora_B"))
    assert all(norm is None for name, norm in norms.items() if ".lora_" not in name)
    assert all(norm is not None and norm > 0 for norm in _grad_norms(prompter.text_hidden_fcs).values())


def test_full_mode_trains_everything_unless_the_vision_tower_is_frozen():
    prompter = Qwen3VLPrompter(train_vlm="full", freeze_vision_tower=False)
    _backward(prompter)
    norms = _grad_norms(prompter)
    missing = [name for name, norm in norms.items() if norm is None]
    assert not missing
    assert all(norm > 0 for name, norm in norms.items() if ".visual." in name and "deepstack" not in name)
    frozen_tower = Qwen3VLPrompter(train_vlm="full")
    trainable = {name for name, p in frozen_tower.vlm.named_parameters() if p.requires_grad}
    assert trainable and not any(".visual." in name for name in trainable)
    assert "model.language_model.embed_tokens.weight" in trainable


def test_off_mode_uses_a_learned_embedding_per_class():
    prompter = Qwen3VLPrompter(train_vlm="off", class_names=["right_ventricle", "myocardium", "left_ventricle"])
    assert prompter.vlm is None
    output = prompter(class_indices=torch.tensor([0, 2, 0]))
    assert output.lm_loss is None and output.embeddings.shape == (3, 256)
    torch.testing.assert_close(output.embeddings[0], output.embeddings[2])
    assert not torch.allclose(output.embeddings[0], output.embeddings[1])
    output.embeddings.sum().backward()
    used = prompter.class_embedding.weight.grad.abs().sum(dim=1)
    assert used[0] > 0 and used[2] > 0 and used[1] == 0
    with pytest.raises(ValueError, match="class_indices"):
        prompter(*_images(), TEXTS)
    with pytest.raises(ValueError, match="class_names"):
        Qwen3VLPrompter(train_vlm="off")


def test_gated_prompt_starts_as_the_class_prompt_and_lets_the_vlm_in_through_its_gate():
    torch.manual_seed(0)
    prompter = Qwen3VLPrompter(class_names=["left_ventricle", "liver"], gated_vlm_prompt=True)
    classes = torch.tensor([0, 0])
    images, overlays = _images()
    closed = prompter(images, overlays, [TEXTS[0], TEXTS[0]], classes)
    # gate at 0: the prompt is the class's learned prompt, whatever the VLM makes of the images
    torch.testing.assert_close(closed.embeddings, prompter.class_prompt.weight[[0, 0]])
    assert torch.isfinite(closed.lm_loss)
    closed.embeddings.sum().backward()
    assert prompter.vlm_gate.grad != 0  # the gate learns whether the VLM's prompt helps
    assert prompter.class_prompt.weight.grad[1].abs().sum() == 0 and prompter.class_prompt.weight.grad[0].abs().sum() > 0
    assert all(float(p.grad.abs().sum()) == 0 for p in prompter.text_hidden_fcs.parameters())

    with torch.no_grad():
        prompter.vlm_gate.fill_(0.5)
    opened = prompter(images, overlays, [TEXTS[0], TEXTS[0]], classes).embeddings
    assert not torch.allclose(opened[0], opened[1])  # different images now give different prompts
    with pytest.raises(ValueError, match="class_indices"):
        prompter(images, overlays, TEXTS)
    with pytest.raises(ValueError, match="class_names"):
        Qwen3VLPrompter(gated_vlm_prompt=True)


def test_unknown_training_mode_raises():
    with pytest.raises(ValueError, match="train_vlm must be one of"):
        Qwen3VLPrompter(train_vlm="partial")


def test_save_and_load_round_trip_gives_identical_prompts(prompter, tmp_path):
    images, overlays = _images(seed=1)
    expected = prompter(images, overlays, TEXTS)
    prompter.save_pretrained(tmp_path / "vlm")
    loaded = Qwen3VLPrompter(vlm_path=tmp_path / "vlm").eval()
    # the MLP belongs to the VESSA weights, not to the Hugging Face directory
    loaded.text_hidden_fcs.load_state_dict(prompter.text_hidden_fcs.state_dict())
    assert loaded.seg_token_id == prompter.seg_token_id
    assert type(loaded.tokenizer) is type(prompter.tokenizer)
    reloaded = loaded(images, overlays, TEXTS)
    assert torch.equal(reloaded.embeddings, expected.embeddings)
    assert torch.equal(reloaded.lm_loss, expected.lm_loss)


def test_saving_a_lora_prompter_merges_the_adapters(tmp_path):
    torch.manual_seed(1)
    prompter = Qwen3VLPrompter(train_vlm="lora", lora_rank=4, lora_dropout=0.0).eval()
    for module in prompter.vlm.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.5)
    images, overlays = _images(seed=2)
    expected = prompter(images, overlays, TEXTS)
    prompter.save_pretrained(tmp_path / "merged")
    merged = Qwen3VLPrompter(vlm_path=tmp_path / "merged", train_vlm="frozen").eval()
    merged.text_hidden_fcs.load_state_dict(prompter.text_hidden_fcs.state_dict())
    assert not any(isinstance(m, LoRALinear) for m in merged.vlm.modules())
    torch.testing.assert_close(merged(images, overlays, TEXTS).embeddings, expected.embeddings, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("removed", [("tokenizer.json",), ("config.json", "tokenizer_config.json")])
def test_incomplete_vlm_directory_names_the_missing_files(prompter, tmp_path, removed):
    folder = prompter.save_pretrained(tmp_path / "vlm")
    for name in removed:
        (folder / name).unlink()
    with pytest.raises(DataError) as error:
        Qwen3VLPrompter(vlm_path=folder)
    assert str(folder) in str(error.value)
    assert all(name in str(error.value) for name in removed)
    with pytest.raises(DataError, match="not a directory"):
        Qwen3VLPrompter(vlm_path=tmp_path / "absent")


def test_tokenizer_ids_must_match_the_config(prompter, tmp_path):
    folder = prompter.save_pretrained(tmp_path / "vlm")
    config = json.loads((folder / "config.json").read_text())
    config["image_token_id"] = config["vision_start_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"tokenizer's id of <\|image_pad\|> differs") as error:
        Qwen3VLPrompter(vlm_path=folder)
    assert str(folder) in str(error.value)


def test_qwen3vl_2b_config_has_2_13_billion_parameters():
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(qwen3vl_2b_config())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 2.13e9) / 2.13e9 < 0.03
    assert model.config.text_config.hidden_size == 2048 and model.config.vision_config.depth == 24
