"""VESSA's vision-language branch: Qwen3-VL answers "Sure, <SEG>." and the ``<SEG>`` hidden state becomes a prompt.

For each sample the prompter builds one chat turn in Qwen3-VL-Instruct's format with two images (the target slice
and the template overlay) and the reference text, appends the assistant answer (teacher forcing: nothing is
generated), runs ``Qwen3VLForConditionalGeneration`` once and reads the last decoder layer's normalised hidden state
at the ``<SEG>`` token. A LISA-style MLP (``text_hidden_fcs``: hidden -> hidden -> ``out_dim``) maps it to one sparse
prompt embedding for SAM2's mask decoder. The language-model cross-entropy on the answer tokens is returned as well,
for Stage-1's ``w_ce * LM CE`` term.

With ``gated_vlm_prompt`` (what :func:`~vessa_components.networks.build_vessa_model` builds) the prompt is a learned
per-class prompt plus ``tanh(vlm_gate)`` times the ``<SEG>`` prompt, with the gate starting at 0 (as Flamingo's gated
cross-attention and ControlNet's zero convolutions start): VESSA starts as its no-VLM form and lets the VLM in only as
far as the segmentation loss finds it useful. A VLM whose prompts carry no information (the tiny random one, a frozen
VLM that does not understand the modality) then cannot make VESSA worse than without it; LISA's and the paper's plain
``<SEG>`` prompt is ``gated_vlm_prompt=False``.

Real weights load from a local Hugging Face directory (``vlm_path``; nothing is ever downloaded). Without one, a tiny
random Qwen3-VL (:func:`tiny_qwen3vl_config`), a byte-level BPE tokenizer trained on the prompt vocabulary
(:func:`build_tiny_tokenizer`) and an image processor for small images are built instead: that model is for tests
and CPU smoke runs only, its prompts carry no meaning. :meth:`Qwen3VLPrompter.save_pretrained` writes model,
tokenizer and image processor in the layout of the published checkpoints, so loading the tiny model back runs the
same code as loading Qwen3-VL-2B-Instruct.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from ..data.abdomenct import ABDOMENCT_CLASS_NAMES
from ..data.acdc import ACDC_CLASS_NAMES
from ..data.errors import DataError
from ..templates.prompt import DEFAULT_ANSWER, DEFAULT_PROMPT_TEMPLATE, SEG_TOKEN, build_prompt

__all__ = [
    "LoRALinear",
    "PromptOutput",
    "Qwen3VLPrompter",
    "VLM_TRAINING_MODES",
    "add_lora",
    "build_tiny_image_processor",
    "build_tiny_tokenizer",
    "check_vlm_directory",
    "qwen3vl_2b_config",
    "tiny_qwen3vl_config",
]

#: ``train_vlm`` values: VLM frozen (only the MLP trains), LoRA on the language model's q/v projections, everything
#: trained, or no VLM at all (a learned embedding per class replaces the ``<SEG>`` hidden state)
VLM_TRAINING_MODES = ("frozen", "lora", "full", "off")

# Qwen's chat and vision special tokens; the published tokenizer has them, the tiny one is built with them
_IM_START, _IM_END, _END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_VISION_START, _VISION_END = "<|vision_start|>", "<|vision_end|>"
_IMAGE_PAD, _VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
_QWEN_SPECIAL_TOKENS = (_END_OF_TEXT, _IM_START, _IM_END, _VISION_START, _VISION_END, _IMAGE_PAD, _VIDEO_PAD)

# Qwen3-VL-Instruct's chat template rendered for one user turn of [image, image, text] (no system message, as the
# template adds none) followed by the assistant turn; each image is one <|image_pad|>, expanded to its token count
_USER_TURN = (
    f"{_IM_START}user\n{_VISION_START}{{target}}{_VISION_END}{_VISION_START}{{overlay}}{_VISION_END}{{prompt}}"
    f"{_IM_END}\n{_IM_START}assistant\n"
)
_ASSISTANT_END = _IM_END

# files a Hugging Face Qwen3-VL directory must hold; each entry is satisfied by any one of its alternatives
_REQUIRED_VLM_FILES = (
    ("config.json",),
    ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ("tokenizer_config.json",),
    ("tokenizer.json", "vocab.json"),
    ("preprocessor_config.json",),
)

_IGNORE_INDEX = -100


class PromptOutput(NamedTuple):
    """What :class:`Qwen3VLPrompter` returns.

    Attributes:
        embeddings: ``(B, out_dim)`` prompt embeddings, one sparse prompt token per sample.
        lm_loss: mean cross-entropy of the answer tokens (a scalar), or ``None`` when ``train_vlm="off"``.
    """

    embeddings: torch.Tensor
    lm_loss: torch.Tensor | None


# ------------------------------------------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: ``y = base(x) + (alpha / rank) * B A dropout(x)``.

    ``A`` (``rank x in``) starts Kaiming-uniform and ``B`` (``out x rank``) at zero, so the wrapped layer initially
    computes exactly what ``base`` does (as in LoRA, Hu et al. 2021). The update is kept in float32 whatever the base
    layer's dtype, so a bfloat16 model still accumulates small adapter steps accurately.

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout probability on the adapter's input.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
        self.base = base.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base(x) + (self.scaling * update).to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the low-rank update added, in the base weight's dtype."""
        update = self.scaling * (self.lora_B @ self.lora_A)
        return (self.base.weight.float() + update).to(self.base.weight.dtype)


def add_lora(
    language_model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ("q_proj", "v_proj"),
) -> list[str]:
    """Replace the linear layers named ``targets`` in every attention block of ``language_model`` by
    :class:`LoRALinear` (LISA adapts ``q_proj`` and ``v_proj``) and return their qualified names."""
    wrapped = []
    for name, module in list(language_model.named_modules()):
        for target in targets:
            child = getattr(module, target, None)
            if isinstance(child, nn.Linear):
                setattr(module, target, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{target}" if name else target)
    if not wrapped:
        raise ValueError(f"No linear layer named any of {list(targets)} to adapt with LoRA.")
    return wrapped


# ------------------------------------------------------------------------------------------------- configs, tiny VLM


def qwen3vl_2b_config() -> Qwen3VLConfig:
    """The architecture of Qwen3-VL-2B-Instruct (as its published ``config.json``), about 2.13 B parameters.

    Use it to build the real-size model with random weights (e.g. for memory and speed checks on a GPU);
    pretrained weights are loaded from a local directory through ``Qwen3VLPrompter(vlm_path=...)`` instead.
    """
    return Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        vision_config={
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 2048,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [5, 11, 17],
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def tiny_qwen3vl_config(tokenizer: PreTrainedTokenizerBase) -> Qwen3VLConfig:
    """A random-weight Qwen3-VL small enough for CPU tests (about 0.24 M parameters), wired to ``tokenizer``'s ids.

    Text: hidden 64, 2 layers, 4 query and 2 key/value heads of 16 channels, multimodal RoPE sections (4, 2, 2)
    (summing to head_dim / 2 as Qwen3-VL requires). Vision: depth 2, hidden 32, patch 16, spatial merge 2 (one
    language token per 32 x 32 pixels, as the real model), output width = the text hidden size.
    """
    token_id = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": token_id(_IM_END),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=token_id(_IMAGE_PAD),
        video_token_id=token_id(_VIDEO_PAD),
        vision_start_token_id=token_id(_VISION_START),
        vision_end_token_id=token_id(_VISION_END),
        tie_word_embeddings=False,
    )


def build_tiny_tokenizer(
    class_names: Iterable[str] | None = None, modalities: Iterable[str] = ("MRI", "CT")
) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in Qwen2's format, trained here on the prompt vocabulary (tests and CPU runs only).

    It uses Qwen2's pre-tokenizer, so any text can be encoded (unseen words fall back to bytes), and carries Qwen's
    chat and vision special tokens. It is a ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``), the class of the
    published Qwen3-VL tokenizers, so a saved copy reloads through ``AutoTokenizer`` exactly as they do. ``<SEG>``
    is not included: the prompter adds it, as it does to the published tokenizer.

    Args:
        class_names: structures named in the training prompts; default: the ACDC and AbdomenCT-1K classes.
        modalities: imaging modalities named in the training prompts.
    """
    if class_names is None:
        class_names = [name for name in (*ACDC_CLASS_NAMES, *ABDOMENCT_CLASS_NAMES) if name != "background"]
    corpus = [build_prompt(c, m) for m in modalities for c in class_names]
    corpus += ["user", "assistant", DEFAULT_ANSWER.replace(SEG_TOKEN, "")]
    bpe = Tokenizer(models.BPE())
    # the same normaliser and pre-tokenisation as Qwen2Tokenizer, so the learned merges apply there unchanged
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair) for pair in trained["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"], merges=merges, unk_token=_END_OF_TEXT, eos_token=_IM_END, pad_token=_END_OF_TEXT
    )
    tokenizer.add_tokens(list(_QWEN_SPECIAL_TOKENS), special_tokens=True)
    return tokenizer


def build_tiny_image_processor() -> Qwen2VLImageProcessor:
    """Qwen3-VL's image processor (patch 16, merge 2, mean = std = 0.5) limited to at most 64 x 64 pixels, so a
    128 x 128 slice becomes 4 language tokens (the published one allows up to 4096 x 4096 pixels)."""
    return Qwen2VLImageProcessor(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def check_vlm_directory(path: str | os.PathLike) -> Path:
    """Check that ``path`` holds a Hugging Face Qwen3-VL checkpoint (config, weights, tokenizer, image processor).

    Raises:
        DataError: naming the directory and every missing file, before transformers fails less legibly.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "vlm_path is not a directory (expected a local Hugging Face Qwen3-VL checkpoint)")
    missing = [" or ".join(names) for names in _REQUIRED_VLM_FILES if not any((path / n).is_file() for n in names)]
    if missing:
        raise DataError(path, f"not a Qwen3-VL checkpoint directory: missing {', '.join(missing)}")
    return path


# -------------------------------------------------------------------------------------------------------- prompter


class Qwen3VLPrompter(nn.Module):
    """Qwen3-VL over (target image, template overlay, reference text) -> one prompt embedding per sample.

    Args:
        vlm_path: a local directory with a Qwen3-VL checkpoint in Hugging Face format (``config.json``, weights,
            tokenizer files, ``preprocessor_config.json``), e.g. Qwen3-VL-2B-Instruct. ``None`` or ``""`` builds the
            tiny random model (tests and CPU runs only). Unused when ``train_vlm="off"``.
        train_vlm: one of :data:`VLM_TRAINING_MODES`: ``"frozen"`` (only the MLP trains; the VLM runs without
            autograd), ``"lora"`` (LoRA adapters on the language model's q/v projections and the MLP train),
            ``"full"`` (everything trains, see ``freeze_vision_tower``), ``"off"`` (no VLM: a learned embedding per
            entry of ``class_names`` goes through the MLP; ``forward`` then takes only ``class_indices``).
        out_dim: width of the prompt embedding (SAM2's prompt embedding width, 256).
        freeze_vision_tower: keep the vision encoder frozen in ``"full"`` mode (LISA does).
        lora_rank: rank of the LoRA updates.
        lora_alpha: LoRA scale numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_dropout: dropout on the LoRA adapters' input.
        class_names: the classes of ``"off"`` mode, in the order of ``class_indices``.
        class_embedding_dim: width of the learned class embeddings of ``"off"`` mode (the MLP's input width).
        gated_vlm_prompt: with a VLM, add the ``<SEG>`` prompt to a learned per-class prompt (``class_prompt``, one
            ``out_dim`` vector per entry of ``class_names``) through ``tanh(vlm_gate)``, ``vlm_gate`` starting at 0;
            ``forward`` then also needs ``class_indices``. Ignored when ``train_vlm="off"``.
        answer: the teacher-forced assistant answer; it must contain exactly one ``<SEG>``.
        min_image_pixels: lower bound of the pixel count each image is resized to (a multiple of 32 x 32);
            ``None`` keeps the image processor's own (65536 for the published Qwen3-VL).
        max_image_pixels: upper bound of that pixel count, which bounds the image tokens per image
            (``max_image_pixels / 1024``); ``None`` keeps the image processor's own.
        torch_dtype: dtype of the VLM's weights (e.g. ``"bfloat16"`` on a GPU); ``None`` keeps float32. The MLP
            always runs in float32.

    ``forward(images, overlays, texts)`` returns a :class:`PromptOutput`. ``images`` and ``overlays`` are
    ``(B, 3, H, W)`` tensors (or sequences of ``(3, H, W)`` tensors, sizes may differ) with values in [0, 1];
    ``texts`` are ``B`` reference texts (see :func:`vessa_components.templates.build_prompt`). The image processor resizes each image to
    multiples of 32 pixels within its pixel budget; one language token covers 32 x 32 pixels.
    """

    def __init__(
        self,
        vlm_path: str | os.PathLike | None = None,
        train_vlm: str = "frozen",
        out_dim: int = 256,
        freeze_vision_tower: bool = True,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        class_names: Sequence[str] | None = None,
        class_embedding_dim: int = 256,
        answer: str = DEFAULT_ANSWER,
        min_image_pixels: int | None = None,
        max_image_pixels: int | None = None,
        torch_dtype: str | torch.dtype | None = None,
        gated_vlm_prompt: bool = False,
    ) -> None:
        super().__init__()
        if train_vlm not in VLM_TRAINING_MODES:
            raise ValueError(f"train_vlm must be one of {VLM_TRAINING_MODES}, got {train_vlm!r}.")
        self.train_vlm = train_vlm
        self.out_dim = out_dim
        self.answer = answer
        self.class_names = tuple(class_names) if class_names is not None else None
        self.min_image_pixels = min_image_pixels
        self.max_image_pixels = max_image_pixels
        self.vlm: Qwen3VLForConditionalGeneration | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.image_processor: Qwen2VLImageProcessor | None = None
        self.class_embedding: nn.Embedding | None = None
        self.class_prompt: nn.Embedding | None = None
        self.vlm_gate: nn.Parameter | None = None
        #: the checkpoint directory the VLM was loaded from; ``None`` for the tiny random VLM and for ``"off"``
        self.vlm_path: str | None = str(vlm_path) if vlm_path and train_vlm != "off" else None

        if train_vlm == "off":
            if not self.class_names:
                raise ValueError("train_vlm='off' needs class_names: one learned embedding per class.")
            self.class_embedding = nn.Embedding(len(self.class_names), class_embedding_dim)
            hidden_size = class_embedding_dim
        else:
            self.vlm, self.tokenizer, self.image_processor = self._load_vlm(vlm_path, _as_dtype(torch_dtype))
            self.seg_token_id = self._add_seg_token()
            self._configure_training(freeze_vision_tower, lora_rank, lora_alpha, lora_dropout)
            hidden_size = self.vlm.config.text_config.hidden_size
            if gated_vlm_prompt:
                if not self.class_names:
                    raise ValueError("gated_vlm_prompt needs class_names: one learned prompt per class.")
                self.class_prompt = nn.Embedding(len(self.class_names), out_dim)
                self.vlm_gate = nn.Parameter(torch.zeros(()))
        self.hidden_size = hidden_size
        # LISA's text_hidden_fcs
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, out_dim)
        )

    # ----------------------------------------------------------------------------------------------- construction

    @staticmethod
    def _load_vlm(
        vlm_path: str | os.PathLike | None, dtype: torch.dtype | None
    ) -> tuple[Qwen3VLForConditionalGeneration, PreTrainedTokenizerBase, Qwen2VLImageProcessor]:
        if not vlm_path:
            tokenizer = build_tiny_tokenizer()
            model = Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(tokenizer))
            if dtype is not None:
                model = model.to(dtype)
            return model, tokenizer, build_tiny_image_processor()
        path = check_vlm_directory(vlm_path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # Qwen3-VL ships Qwen2-VL's image processor; the full Qwen3VLProcessor would also need a video processor
        image_processor = Qwen2VLImageProcessor.from_pretrained(path, local_files_only=True)
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=dtype or torch.float32
        )
        for token, config_id in (
            (_IMAGE_PAD, model.config.image_token_id),
            (_VISION_START, model.config.vision_start_token_id),
            (_VISION_END, model.config.vision_end_token_id),
        ):
            if tokenizer.convert_tokens_to_ids(token) != config_id:
                raise DataError(path, f"the tokenizer's id of {token} differs from config.json's ({config_id})")
        return model, tokenizer, image_processor

    def _add_seg_token(self) -> int:
        """Add ``<SEG>`` to the tokenizer (a no-op for a saved prompter's tokenizer) and make sure it has an
        embedding row: the published Qwen3-VL has spare rows beyond its tokenizer, the tiny model gets one added."""
        self.tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
        seg_token_id = self.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        if seg_token_id >= self.vlm.get_input_embeddings().num_embeddings:
            self.vlm.resize_token_embeddings(len(self.tokenizer))
        return seg_token_id

    def _configure_training(self, freeze_vision_tower: bool, rank: int, alpha: float, dropout: float) -> None:
        if self.train_vlm == "full":
            self.vlm.requires_grad_(True)
            if freeze_vision_tower:
                self.vlm.model.visual.requires_grad_(False)
            return
        self.vlm.requires_grad_(False)
        if self.train_vlm == "lora":
            add_lora(self.vlm.model.language_model, rank, alpha, dropout)

    # ------------------------------------------------------------------------------------------------------ inputs

    def build_inputs(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        overlays: torch.Tensor | Sequence[torch.Tensor],
        texts: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """The model inputs of a batch: right-padded ``input_ids``, ``attention_mask``, ``labels`` (the answer
        tokens; ``-100`` elsewhere), ``mm_token_type_ids`` (1 on image tokens), ``pixel_values`` and
        ``image_grid_thw`` (target then overlay for each sample), all on the VLM's device."""
        if not len(images) == len(overlays) == len(texts):
            raise ValueError(
                f"Need one overlay and one text per image, got {len(images)} images, {len(overlays)} overlays and "
                f"{len(texts)} texts."
            )
        pairs = [image.detach() for pair in zip(images, overlays) for image in pair]
        if any(image.ndim != 3 or image.shape[0] != 3 for image in pairs):
            raise ValueError(
                f"Images and overlays must be (3, H, W) RGB tensors, got shapes {[tuple(i.shape) for i in pairs]}."
            )
        device = self.vlm.device
        size = dict(self.image_processor.size)
        if self.min_image_pixels is not None:
            size["shortest_edge"] = self.min_image_pixels
        if self.max_image_pixels is not None:
            size["longest_edge"] = self.max_image_pixels
        pixels = self.image_processor(images=pairs, size=size, do_rescale=False, return_tensors="pt", device=device)
        merge_length = self.image_processor.merge_size**2
        image_tokens = (pixels["image_grid_thw"].prod(dim=-1) // merge_length).tolist()
        answer_ids = self._encode(self.answer + _ASSISTANT_END)
        sequences, answer_starts = [], []
        for i, text in enumerate(texts):
            prompt = _USER_TURN.format(
                target=_IMAGE_PAD * image_tokens[2 * i], overlay=_IMAGE_PAD * image_tokens[2 * i + 1], prompt=text
            )
            prompt_ids = self._encode(prompt)
            sequences.append(prompt_ids + answer_ids)
            answer_starts.append(len(prompt_ids))
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, _IGNORE_INDEX)
        for i, (sequence, start) in enumerate(zip(sequences, answer_starts)):
            input_ids[i, : len(sequence)] = torch.tensor(sequence)
            attention_mask[i, : len(sequence)] = 1
            labels[i, start : len(sequence)] = input_ids[i, start : len(sequence)]
        mm_token_type_ids = (input_ids == self.vlm.config.image_token_id).int()
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "mm_token_type_ids": mm_token_type_ids,
        }
        inputs = {key: value.to(device) for key, value in inputs.items()}
        inputs["pixel_values"] = pixels["pixel_values"].to(device=device, dtype=self.vlm.dtype)
        inputs["image_grid_thw"] = pixels["image_grid_thw"].to(device)
        return inputs

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def seg_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The index of the ``<SEG>`` token in each row of ``input_ids`` (``(B,)``).

        Raises:
            ValueError: if a row does not hold exactly one ``<SEG>`` (e.g. an answer without it, or one in the text).
        """
        is_seg = input_ids == self.seg_token_id
        counts = is_seg.sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"Every sequence must contain exactly one {SEG_TOKEN} token; counts per sample: {counts.tolist()}. "
                f"Check the answer ({self.answer!r}) and that the texts do not contain {SEG_TOKEN}."
            )
        return is_seg.int().argmax(dim=1)

    # ----------------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor] | None = None,
        overlays: torch.Tensor | Sequence[torch.Tensor] | None = None,
        texts: Sequence[str] | None = None,
        class_indices: torch.Tensor | None = None,
    ) -> PromptOutput:
        """Prompt embeddings ``(B, out_dim)`` and the answer's LM loss; see the class docstring for the inputs.

        With ``train_vlm="off"`` only ``class_indices`` (``(B,)`` indices into ``class_names``) is used and
        ``lm_loss`` is ``None``; ``gated_vlm_prompt`` needs ``class_indices`` as well.
        """
        if self.class_embedding is not None:
            if class_indices is None:
                raise ValueError("train_vlm='off' needs class_indices (indices into class_names).")
            hidden = self.class_embedding(class_indices.to(self.class_embedding.weight.device))
            return PromptOutput(self.text_hidden_fcs(hidden), None)
        if images is None or overlays is None or texts is None:
            raise ValueError("The VLM prompter needs images, overlays and texts.")
        inputs = self.build_inputs(images, overlays, texts)
        labels = inputs.pop("labels")
        seg_positions = self.seg_token_positions(inputs["input_ids"])
        # a frozen VLM needs no autograd graph: it would only hold activations in memory
        vlm_trains = any(p.requires_grad for p in self.vlm.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vlm_trains):
            # the inner model's last_hidden_state is the final decoder layer after the last RMSNorm (the input of
            # lm_head) in every transformers version, unlike hidden_states[-1]
            hidden = self.vlm.model(**inputs, use_cache=False).last_hidden_state
            lm_loss = self._answer_loss(hidden, labels)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        seg_hidden = hidden[rows, seg_positions].to(self.text_hidden_fcs[0].weight.dtype)
        prompt = self.text_hidden_fcs(seg_hidden)
        if self.class_prompt is not None:
            if class_indices is None:
                raise ValueError("gated_vlm_prompt needs class_indices (indices into class_names).")
            prompt = self.class_prompt(class_indices.to(prompt.device)) + torch.tanh(self.vlm_gate) * prompt
        return PromptOutput(prompt, lm_loss)

    def _answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens, as the model's own loss with these labels, but with
        ``lm_head`` applied only where a label is predicted (the vocabulary is 152 k wide)."""
        rows, columns = torch.nonzero(labels[:, 1:] != _IGNORE_INDEX, as_tuple=True)
        logits = self.vlm.lm_head(hidden[rows, columns])
        return F.cross_entropy(logits.float(), labels[rows, columns + 1])

    # ------------------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the VLM (LoRA updates merged into their base weights), tokenizer (with ``<SEG>``) and image
        processor to ``save_directory`` in Hugging Face format, loadable as ``Qwen3VLPrompter(vlm_path=...)``.

        The MLP (and the adapters, unmerged) belong to the prompter's ``state_dict``, saved with the VESSA weights.
        Files are written to a temporary folder next to the target and then moved in one by one, so an interrupted
        save never leaves a half-written file.
        """
        if self.vlm is None:
            raise ValueError("train_vlm='off' has no VLM to save.")
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            self.vlm.save_pretrained(staging, state_dict=self._hf_state_dict())
            self.tokenizer.save_pretrained(staging)
            self.image_processor.save_pretrained(staging)
            target.mkdir(exist_ok=True)
            for file in staging.iterdir():
                os.replace(file, target / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The VLM's state dict under Hugging Face's parameter names, with LoRA updates merged."""
        state = self.vlm.state_dict()
        for name, module in self.vlm.named_modules():
            if isinstance(module, LoRALinear):
                for key in [k for k in state if k.startswith(f"{name}.")]:
                    del state[key]
                state[f"{name}.weight"] = module.merged_weight().detach()
                if module.base.bias is not None:
                    state[f"{name}.bias"] = module.base.bias.detach()
        return state


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; dtypes and ``None`` pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown torch dtype {dtype!r}.")
    return value
