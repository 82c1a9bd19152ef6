"""TemplateBank on real ACDC slices: contents and cues, matching (exclusion, cues, batching), embeddings, save / load,
building from a datalist, tools/build_template_bank.py, and every error."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vessa_components.data import ACDC_CLASS_NAMES, DataError, make_slice_datalist, read_h5
from vessa_components.templates import THUMBNAIL_ENCODER_NAME, TemplateBank, slice_cues, thumbnail_embedding

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def datalist(acdc_root: Path) -> dict:
    return make_slice_datalist(acdc_root, labeled_cases=3)


@pytest.fixture(scope="module")
def entries(datalist: dict) -> list[dict]:
    """Every other labelled slice of the 3 published labelled patients (34 slices, both frames of each)."""
    return datalist["labeled"][::2]


@pytest.fixture(scope="module")
def bank(entries: list[dict]) -> TemplateBank:
    """Shared, never modified by the tests."""
    return TemplateBank.from_datalist(entries, "acdc", "MRI", ACDC_CLASS_NAMES, image_size=IMAGE_SIZE)


def slice_image(entry: dict) -> torch.Tensor:
    """The entry's slice at its native size, [1, H, W]."""
    return torch.from_numpy(read_h5(entry["image"], "image")[0])[None]


def small_bank(**kwargs) -> TemplateBank:
    """A synthetic one-data-set bank (toy classes a, b) with nothing added yet."""
    bank = TemplateBank(image_size=16, **kwargs)
    bank.add_dataset("toy", "CT", ["background", "a", "b"])
    return bank


def noise(seed: int) -> torch.Tensor:
    return torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(seed))


def square_label(value: int = 1) -> torch.Tensor:
    label = torch.zeros(16, 16, dtype=torch.uint8)
    label[4:12, 4:12] = value
    return label


def load_tool():
    """tools/build_template_bank.py as a module (tools/ is not a package), to call ``main`` in-process."""
    spec = importlib.util.spec_from_file_location("build_template_bank", REPO_ROOT / "tools" / "build_template_bank.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- contents and cues


def test_bank_holds_resized_slices_labels_and_cues(bank: TemplateBank, entries: list[dict]) -> None:
    assert len(bank) == len(entries) == 34
    assert bank.datasets() == ["acdc"]
    assert bank.classes() == bank.classes("acdc") == list(ACDC_CLASS_NAMES)
    assert bank.modality("acdc") == "MRI"
    assert bank.encoder_name == THUMBNAIL_ENCODER_NAME
    assert {e.patient for e in bank.exemplars} == {"patient099", "patient038", "patient050"}
    assert bank.images.shape == (34, 1, IMAGE_SIZE, IMAGE_SIZE) and bank.images.dtype == torch.float32
    assert 0.0 <= float(bank.images.min()) and float(bank.images.max()) <= 1.0
    assert bank.labels.shape == (34, IMAGE_SIZE, IMAGE_SIZE) and bank.labels.dtype == torch.uint8
    # nearest-neighbour resizing keeps class values only, and the classes of the native slice
    for i in (0, 9, 20):
        native = np.unique(read_h5(entries[i]["label"], "label")[0])
        assert set(torch.unique(bank.labels[i]).tolist()) == set(native.tolist())
    for exemplar, entry in zip(bank.exemplars, entries):
        assert exemplar.name == entry["name"] and exemplar.patient == entry["patient"]
        assert exemplar.phase == ("ED" if "_frame01_" in entry["name"] else "ES")
    # within one stack, the position grows with the slice index from 0 to 1
    stack = sorted(
        (int(e.name.rsplit("_", 1)[1]), e.relative_position)
        for e in bank.exemplars
        if e.name.startswith("patient099_frame01_")
    )
    positions = [p for _, p in stack]
    assert positions[0] == 0.0 and positions[-1] == 1.0 and positions == sorted(positions)
    assert torch.allclose(bank.embeddings.norm(dim=1), torch.ones(len(bank)))


def test_slice_cues() -> None:
    names = [
        "p1_frame01_slice_1",
        "p1_frame01_slice_3",
        "p1_frame01_slice_2",
        "p1_frame02_slice_0",
        "p1_frame02_slice_4",
        "Case_00001_slice_7",
        "Case_00001_slice_9",
        "single_frame02_slice_5",
        "volume_frame01",
        "p2_frame12_slice_1",
    ]
    assert slice_cues(names) == [
        (0.0, "ED"),
        (1.0, "ED"),
        (0.5, "ED"),
        (0.0, "ES"),  # counted from 0 or from 1, the first slice is 0
        (1.0, "ES"),
        (0.0, None),
        (1.0, None),
        (None, "ES"),  # a stack of one slice has no position
        (None, "ED"),
        (None, None),  # an unmapped frame number has no phase
    ]
    assert slice_cues(["x_frame12_slice_1"], frame_phases={12: "ES"}) == [(None, "ES")]


# ---------------------------------------------------------------------------------------------- matching


def test_match_excludes_the_patient_and_returns_masks_of_the_class(bank: TemplateBank, entries: list[dict]) -> None:
    query = slice_image(entries[3])
    for class_name in ACDC_CLASS_NAMES[1:]:
        matches = bank.match(query, class_name, k=5, exclude_patient="patient099")
        assert len(matches) == 5
        assert all(m.patient != "patient099" and m.class_name == class_name and m.dataset == "acdc" for m in matches)
        scores = [m.score for m in matches]
        assert scores == sorted(scores, reverse=True)
        value = ACDC_CLASS_NAMES.index(class_name)
        for m in matches:
            assert m.mask.shape == (1, IMAGE_SIZE, IMAGE_SIZE) and m.mask.sum() > 0
            assert torch.equal(m.mask[0], (bank.labels[m.index] == value).float())
            assert torch.equal(m.image, bank.images[m.index]) and m.name == bank.exemplars[m.index].name
    # more matches asked than qualify: exactly the qualifying exemplars
    everything = bank.match(query, "left_ventricle", k=1000, exclude_patient="patient038")
    qualifying = [i for i, e in enumerate(bank.exemplars) if e.patient != "patient038" and (bank.labels[i] == 3).any()]
    assert 0 < len(qualifying) < len(bank) and sorted(m.index for m in everything) == qualifying


def test_a_slice_in_the_bank_matches_itself(bank: TemplateBank, entries: list[dict]) -> None:
    # a mid-ventricular slice shows every class; the query is the native-size slice, resized like the bank's copy
    index = next(i for i, e in enumerate(entries) if 3 in read_h5(e["label"], "label")[0])
    best = bank.match(slice_image(entries[index]), "left_ventricle", k=2)
    assert best[0].index == index and best[0].name == entries[index]["name"]
    assert best[0].score == pytest.approx(1.0, abs=1e-5)
    assert best[1].score < best[0].score


def test_position_and_phase_cues_change_the_ranking() -> None:
    query = noise(0)
    close_image = (0.8 * query + 0.2 * noise(1)).clamp(0, 1)  # very similar, but not identical

    def two_exemplars(**weights) -> TemplateBank:
        bank = small_bank(**weights)
        bank.add(query, square_label(), "toy", "p1", "same_image", relative_position=0.0, phase="ED")
        bank.add(close_image, square_label(), "toy", "p2", "similar_image", relative_position=1.0, phase="ES")
        return bank

    plain = two_exemplars()
    assert [m.name for m in plain.match(query, "a", k=2, position=1.0, phase="ES")] == ["same_image", "similar_image"]
    by_position = two_exemplars(position_weight=1.0)
    ranked = by_position.match(query, "a", k=2, position=1.0)
    assert [m.name for m in ranked] == ["similar_image", "same_image"]
    cosine = plain.match(query, "a", k=2)
    assert ranked[0].score == pytest.approx(cosine[1].score + 1.0) and ranked[1].score == pytest.approx(1.0)
    assert by_position.match(query, "a", k=1)[0].name == "same_image"  # a query without a position ignores the cue
    by_phase = two_exemplars(phase_weight=1.0)
    assert by_phase.match(query, "a", k=1, phase="ES")[0].name == "similar_image"
    assert by_phase.match(query, "a", k=1, phase="ED")[0].name == "same_image"


def test_match_batch_equals_match_per_item(entries: list[dict]) -> None:
    bank = TemplateBank.from_datalist(
        entries, "acdc", "MRI", ACDC_CLASS_NAMES, image_size=IMAGE_SIZE, position_weight=0.3, phase_weight=0.2
    )
    picks = [entries[i] for i in (0, 5, 12, 20, 30)]
    images = torch.stack([torch.nn.functional.interpolate(slice_image(e)[None], (100, 90))[0] for e in picks])
    classes = ["left_ventricle", "myocardium", "right_ventricle", "left_ventricle", "myocardium"]
    patients = [e["patient"] for e in picks]
    positions = [0.2, None, 0.9, 0.5, 0.0]
    phases = ["ED", "ES", None, "ES", "ED"]
    calls = []

    def counting_thumbnails(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return thumbnail_embedding(batch)

    bank.embed(counting_thumbnails)
    calls.clear()
    batched = bank.match_batch(
        images, classes, k=3, exclude_patient=patients, positions=positions, phases=phases, dataset="acdc"
    )
    assert calls == [len(picks)]  # one encoder call for the whole batch
    for image, c, p, pos, ph, result in zip(images, classes, patients, positions, phases, batched):
        single = bank.match(image, c, k=3, exclude_patient=p, position=pos, phase=ph, dataset="acdc")
        assert [m.index for m in single] == [m.index for m in result]
        assert [m.score for m in single] == pytest.approx([m.score for m in result], abs=1e-5)
        assert all(torch.equal(a.mask, b.mask) for a, b in zip(single, result))


# ---------------------------------------------------------------------------------------------- embeddings


def test_embed_is_batched_and_normalised(bank: TemplateBank) -> None:
    calls = []

    def scaled_thumbnails(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape)
        return 5.0 * thumbnail_embedding(batch, size=8)

    copy = TemplateBank(image_size=IMAGE_SIZE)
    copy.add_dataset("acdc", "MRI", ACDC_CLASS_NAMES)
    for image, label, exemplar in zip(bank.images, bank.labels, bank.exemplars):
        copy.add(image, label, "acdc", exemplar.patient, exemplar.name)
    embeddings = copy.embed(scaled_thumbnails, batch_size=8, encoder_name="thumb8")
    assert [shape[0] for shape in calls] == [8, 8, 8, 8, len(copy) - 32]
    assert all(shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE) for shape in calls)
    assert embeddings.shape == (len(copy), 64)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(copy)))
    assert copy.encoder_name == "thumb8" and copy.embed_fn is scaled_thumbnails


def test_exemplars_added_after_embed_are_embedded_on_the_next_match() -> None:
    bank = small_bank()
    bank.add(noise(0), square_label(), "toy", "p1")
    bank.embed()
    bank.add(noise(1), square_label(), "toy", "p2", "late")
    assert bank.embeddings is None  # stale
    best = bank.match(noise(1), "a")[0]
    assert best.name == "late" and best.score == pytest.approx(1.0, abs=1e-5)
    assert bank.embeddings.shape[0] == 2


def test_a_different_encoder_re_embeds_the_bank() -> None:
    bank = small_bank()
    bank.add(noise(0), square_label(), "toy", "p1")
    assert bank.match(noise(0), "a")[0].score == pytest.approx(1.0, abs=1e-5)
    assert bank.embeddings.shape == (1, 256)
    bank.match(noise(0), "a", embed_fn=lambda x: thumbnail_embedding(x, size=4))
    assert bank.embeddings.shape == (1, 16)


def test_bad_encoder_output_is_an_error() -> None:
    bank = small_bank(embed_fn=lambda x: x.flatten())
    bank.add(noise(0), square_label(), "toy", "p1")
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        bank.embed()


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(bank: TemplateBank, entries: list[dict], tmp_path: Path) -> None:
    weighted = TemplateBank(image_size=IMAGE_SIZE, position_weight=0.25, phase_weight=0.5)
    weighted.add_dataset("acdc", "MRI", ACDC_CLASS_NAMES)
    for image, label, e in zip(bank.images, bank.labels, bank.exemplars):
        weighted.add(image, label, "acdc", e.patient, e.name, e.relative_position, e.phase)
    weighted.add_dataset("ct", "CT", ["background", "liver"])
    weighted.add(noise(3), square_label(), "ct", "case1", "case1_slice_1")
    weighted.embed()
    out = weighted.save(tmp_path / "bank")
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "tensors.safetensors"]  # no temporary leftovers
    loaded = TemplateBank.load(out)
    assert loaded.exemplars == weighted.exemplars
    assert loaded.datasets() == ["acdc", "ct"] and loaded.classes("ct") == ["background", "liver"]
    assert loaded.modality("ct") == "CT" and loaded.image_size == IMAGE_SIZE
    assert (loaded.position_weight, loaded.phase_weight) == (0.25, 0.5)
    assert torch.equal(loaded.embeddings, weighted.embeddings)
    query = slice_image(entries[7])
    for kwargs in (
        {"class_name": "myocardium", "exclude_patient": "patient050", "position": 0.5, "phase": "ES"},
        {"class_name": "liver"},
    ):
        before, after = weighted.match(query, k=4, **kwargs), loaded.match(query, k=4, **kwargs)
        assert [(m.index, m.score, m.name) for m in before] == [(m.index, m.score, m.name) for m in after]
        assert all(torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) for a, b in zip(before, after))
    # saving again over the same folder replaces it
    loaded.add(noise(4), square_label(), "ct", "case2")
    loaded.save(out)
    assert len(TemplateBank.load(out)) == len(weighted) + 1
    assert TemplateBank.load(out).embeddings is None  # saved while stale: no embeddings, recomputed on use


def test_a_bank_made_by_another_encoder_needs_it_after_load(tmp_path: Path) -> None:
    def thumb8(batch: torch.Tensor) -> torch.Tensor:
        return thumbnail_embedding(batch, size=8)

    bank = small_bank(embed_fn=thumb8)
    bank.add(noise(0), square_label(), "toy", "p1")
    bank.embed()
    bank.save(tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["encoder_name"].endswith("thumb8")
    loaded = TemplateBank.load(tmp_path)
    assert loaded.embed_fn is None
    with pytest.raises(ValueError, match="no encoder to embed the query"):
        loaded.match(noise(0), "a")
    calls = []

    def counting_thumb8(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return thumb8(batch)

    with_encoder = TemplateBank.load(tmp_path, embed_fn=counting_thumb8)
    assert with_encoder.match(noise(0), "a")[0].score == pytest.approx(1.0, abs=1e-5)
    assert calls == [1]  # the stored embeddings were used; only the query went through the encoder
    loaded.add(noise(1), square_label(), "toy", "p2")
    with pytest.raises(ValueError, match="missing or stale"):
        loaded.match(noise(0), "a")


def test_load_errors_name_the_file(bank: TemplateBank, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="index.json"):
        TemplateBank.load(tmp_path / "nowhere")
    good = bank.save(tmp_path / "good")
    index = json.loads((good / "index.json").read_text())

    def broken(
        name: str, index_text: str | None = None, tensor_bytes: bytes | None = None, checksum: bool = True
    ) -> Path:
        """A copy of the good bank with its index text or tensor file replaced (and, if asked, its checksum fixed)."""
        folder = bank.save(tmp_path / name)
        if index_text is not None:
            (folder / "index.json").write_text(index_text)
        if tensor_bytes is not None:
            (folder / "tensors.safetensors").write_bytes(tensor_bytes)
            if checksum:
                fixed = {**index, "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest()}
                (folder / "index.json").write_text(json.dumps(fixed))
        return folder

    save_file(
        {"images": torch.zeros(2, 1, 8, 8), "labels": torch.zeros(2, 8, 8, dtype=torch.uint8)}, tmp_path / "small"
    )
    good_bytes = (good / "tensors.safetensors").read_bytes()
    missing = broken("missing_tensors")
    (missing / "tensors.safetensors").unlink()
    cases = {
        "index.json": [
            broken("truncated_index", index_text=(good / "index.json").read_text()[:100]),
            broken("old_version", index_text=json.dumps({**index, "format_version": 0})),
            broken("no_datasets", index_text=json.dumps({k: v for k, v in index.items() if k != "datasets"})),
            broken("bad_exemplar", index_text=json.dumps({**index, "exemplars": [{"colour": 1}] * len(bank)})),
        ],
        "tensors.safetensors": [
            missing,
            broken("corrupt_tensors", tensor_bytes=good_bytes[:-10] + b"\xff" * 10, checksum=False),
            broken("garbage_tensors", tensor_bytes=b"not a safetensors file"),
            broken("wrong_shapes", tensor_bytes=(tmp_path / "small").read_bytes()),
        ],
    }
    for file_name, folders in cases.items():
        for folder in folders:
            with pytest.raises(DataError) as info:
                TemplateBank.load(folder)
            assert str(folder / file_name) in str(info.value), folder.name


# ---------------------------------------------------------------------------------------------- errors


def test_matching_errors(bank: TemplateBank) -> None:
    query = torch.rand(1, 40, 40)
    with pytest.raises(ValueError, match="empty"):
        small_bank().match(query, "a")
    with pytest.raises(ValueError, match=r"unknown class 'aorta'.*left_ventricle"):
        bank.match(query, "aorta")
    with pytest.raises(ValueError, match=r"unknown data set 'lits'.*acdc"):
        bank.match(query, "left_ventricle", dataset="lits")
    with pytest.raises(ValueError, match=r"one value or 2"):
        bank.match_batch(torch.rand(2, 1, 40, 40), ["myocardium"] * 3)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        bank.match_batch(torch.rand(2, 40, 40), "myocardium")
    only_a = small_bank()
    only_a.add(noise(0), square_label(1), "toy", "p1")
    only_a.add(noise(1), square_label(2), "toy", "p2")
    with pytest.raises(ValueError, match=r"no exemplar shows class 'b' in data set 'toy' apart from patient 'p2'"):
        only_a.match(query, "b", dataset="toy", exclude_patient="p2")
    only_a.add_dataset("other", "MRI", ["background", "b"])
    with pytest.raises(
        ValueError, match=r"unknown class 'a' for data set 'other'; known classes: \['background', 'b'\]"
    ):
        only_a.match(query, "a", dataset="other")
    with pytest.raises(ValueError, match=r"no exemplar shows class 'b' in data set 'other'"):
        only_a.match(query, "b", dataset="other")


def test_add_errors() -> None:
    bank = small_bank()
    with pytest.raises(ValueError, match="unknown data set 'ghost'"):
        bank.add(noise(0), square_label(), "ghost", "p1")
    with pytest.raises(ValueError, match="2D slice"):
        bank.add(torch.rand(2, 16, 16), square_label(), "toy", "p1")
    with pytest.raises(ValueError, match=r"normalise the slice to \[0, 1\]"):
        bank.add(noise(0) * 255, square_label(), "toy", "p1")
    with pytest.raises(ValueError, match="not all class indices"):
        bank.add(noise(0), square_label(3), "toy", "p1")
    with pytest.raises(ValueError, match="already registered"):
        bank.add_dataset("toy", "MRI", ["background", "a", "b"])
    assert len(bank) == 0


def test_from_datalist_errors_name_the_file(datalist: dict, tmp_path: Path) -> None:
    volume = datalist["validation"][0]  # a 3D volume, not a slice
    unlabelled = datalist["unlabeled"][0]
    bad_label = tmp_path / "bad_label.h5"
    bad_image = tmp_path / "bad_image.h5"
    for path, image, label in ((bad_label, 0.5, 9), (bad_image, 300.0, 1)):
        with h5py.File(path, "w") as f:
            f["image"] = np.full((20, 20), image, dtype=np.float32)
            f["label"] = np.full((20, 20), label, dtype=np.uint8)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    for entry, problem in (
        (volume, "2D slice"),
        (unlabelled, "no 'label'"),
        ({"image": str(bad_label), "label": str(bad_label)}, "not all class indices"),
        ({"image": str(bad_image), "label": str(bad_image)}, r"\[0, 1\]"),
        ({"image": str(broken), "label": str(broken)}, "HDF5"),
    ):
        with pytest.raises(DataError, match=problem) as info:
            TemplateBank.from_datalist([entry], "acdc", "MRI", ACDC_CLASS_NAMES, image_size=16)
        assert str(entry["image"]) in str(info.value)


# ---------------------------------------------------------------------------------------------- command-line tool


def test_build_template_bank_tool(datalist: dict, entries: list[dict], tmp_path: Path, capsys) -> None:
    datalist_path = tmp_path / "datalist.json"
    datalist_path.write_text(json.dumps({"labeled": entries[:10], "unlabeled": []}))
    tool = load_tool()
    tool.main(
        str(datalist_path),
        str(tmp_path / "bank"),
        "acdc",
        "MRI",
        ("background", "right_ventricle", "myocardium", "left_ventricle"),
        image_size=32,
        position_weight=0.1,
    )
    assert "10 exemplars" in capsys.readouterr().out
    bank = TemplateBank.load(tmp_path / "bank")
    assert len(bank) == 10 and bank.image_size == 32 and bank.position_weight == 0.1
    assert bank.classes("acdc") == list(ACDC_CLASS_NAMES) and bank.embeddings.shape == (10, 256)
    for bad in (tmp_path / "missing.json", tmp_path / "no_labeled.json"):
        if bad.name == "no_labeled.json":
            bad.write_text(json.dumps({"training": []}))
        with pytest.raises(DataError) as info:
            tool.main(str(bad), str(tmp_path / "out"), "acdc", "MRI", "background,left_ventricle")
        assert str(bad) in str(info.value)
