"""Model Zoo form of every bundle in bundles/: the checks the Model Zoo's CI runs, the release zip, and clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from vessa_components.bundle import BundleCheckError, check_metadata_schema, export_model_zoo, inference_data_paths
from vessa_components.data import ACDC_CLASS_NAMES, make_slice_datalist
from vessa_components.templates import TemplateBank

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parents[1].name for p in (REPO_ROOT / "bundles").glob("*/configs/metadata.json"))
# bundles whose network cannot be scripted (their docs/README.md says so); every other bundle must export
NOT_SCRIPTABLE: set[str] = {"vessa_foundation"}
# the network that network_data_format describes, where it is not network_def (the Model Zoo's custom_net_config_dict)
NET_IDS: dict[str, str] = {"vessa_foundation": "segmenter"}
# bundles whose inference reads the template bank that training writes into the bundle (output_dir)
WITH_TEMPLATE_BANK: set[str] = {"vessa_foundation"}
# known gaps, strict: the case fails loudly once the bundle passes, so that the entry is removed
KNOWN_GAPS: dict[str, str] = {}


def _bundle_cases():
    return [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=True)) if n in KNOWN_GAPS else n
        for n in BUNDLES
    ]


def _write_template_bank(bundle: Path, acdc_root: Path) -> None:
    """``template_bank/`` as a vessa_foundation run on ACDC writes it (thumbnail encoder; real labelled slices of one
    patient), at the slice size of the bundle's network_data_format."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    size = meta["network_data_format"]["inputs"]["image"]["spatial_shape"][0]
    labeled = make_slice_datalist(acdc_root, labeled_cases="099")["labeled"][::4]
    TemplateBank.from_datalist(labeled, "acdc", "MRI", ACDC_CLASS_NAMES, image_size=size).save(bundle / "template_bank")


def _stage_bundle(name: str, dst: Path, acdc_root: Path | None = None) -> Path:
    """A copy of the bundle's shipped files in ``dst/<name>`` with ``models/model.pt`` = the state_dict of its
    ``network_def`` (random weights: the checks are about form, not accuracy) and, for bundles of
    ``WITH_TEMPLATE_BANK``, a template bank built from ``acdc_root``: the bundle as training in place leaves it."""
    src, bundle = REPO_ROOT / "bundles" / name, dst / name
    for sub in ("configs", "docs"):
        shutil.copytree(src / sub, bundle / sub)
    if (src / "LICENSE").is_file():
        shutil.copy(src / "LICENSE", bundle / "LICENSE")
    if name in WITH_TEMPLATE_BANK:
        assert acdc_root is not None, f"{name} needs a template bank: pass acdc_root"
        _write_template_bank(bundle, acdc_root)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def _edit_metadata(bundle: Path, **changes) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta, indent=4))


@pytest.mark.parametrize("name", _bundle_cases())
def test_repository_metadata_follows_schema(name):
    check_metadata_schema(REPO_ROOT / "bundles" / name / "configs" / "metadata.json")


def _network(bundle: Path, net_id: str) -> torch.nn.Module:
    """``net_id`` of the bundle's inference config on the CPU, in eval mode, with ``models/model.pt`` loaded into
    ``network_def`` (which ``net_id`` wraps when it is not ``network_def`` itself)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "cpu"
    parser.get_parsed_content("network_def").load_state_dict(
        torch.load(bundle / "models" / "model.pt", weights_only=True)
    )
    return parser.get_parsed_content(net_id).to("cpu").eval()


@pytest.mark.parametrize("name", _bundle_cases())
def test_model_zoo_checks_and_release_zip(request, tmp_path, name):
    acdc_root = request.getfixturevalue("acdc_root") if name in WITH_TEMPLATE_BANK else None
    bundle = _stage_bundle(name, tmp_path / "src", acdc_root)
    scriptable, net_id = name not in NOT_SCRIPTABLE, NET_IDS.get(name, "network_def")
    result = export_model_zoo(bundle, output_dir=tmp_path / "dist", torchscript=scriptable, net_id=net_id)

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert result.version == meta["version"] and result.changes == meta["changelog"][meta["version"]]
    assert result.zip_path == tmp_path / "dist" / f"{name}_v{meta['version']}.zip"
    expected = {f"configs/{p.name}" for p in (bundle / "configs").iterdir()}
    expected |= {f"docs/{p.name}" for p in (bundle / "docs").iterdir()}
    expected |= {"LICENSE", "models/model.pt"} | ({"models/model.ts"} if scriptable else set())
    if name in WITH_TEMPLATE_BANK:  # the bank inference reads is shipped, without asking for it
        bank_files = {p.relative_to(bundle).as_posix() for p in (bundle / "template_bank").rglob("*") if p.is_file()}
        assert "template_bank/index.json" in bank_files
        expected |= bank_files
    with zipfile.ZipFile(result.zip_path) as archive:
        assert set(archive.namelist()) == {f"{name}/{rel}" for rel in expected}  # the bundle folder at the zip's root
        assert meta["changelog"][meta["version"]] in archive.comment.decode()
        assert json.loads(archive.read(f"{name}/configs/metadata.json")) == meta
        archive.extractall(tmp_path / "unzipped")
    assert not list((tmp_path / "dist").glob(".*")), "the staging folder is removed"

    shipped = tmp_path / "unzipped" / name
    assert (shipped / "models" / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    # the unzipped release runs on its own (its configs, weights and bank) and gives what the source bundle gives
    network = _network(shipped, net_id)
    spec, out_spec = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    x = torch.rand(1, spec["num_channels"], *[s if isinstance(s, int) else 16 for s in spec["spatial_shape"]])
    with torch.no_grad():
        out = network(x)
        assert out.shape == (1, out_spec["num_channels"], *x.shape[2:])
        torch.testing.assert_close(out, _network(bundle, net_id)(x))
        if scriptable:
            torch.testing.assert_close(torch.jit.load(str(shipped / "models" / "model.ts"))(x), out)
    assert result.checks[-1] == ("torchscript export and load" if scriptable else "network in/out")
    if not scriptable:
        assert "torchscript" in (shipped / "docs" / "README.md").read_text().lower()


def test_foundation_release_takes_weights_and_bank_from_the_run(tmp_path, acdc_root):
    """Training writes models/model.pt and template_bank/ to its output_dir; the release takes both from run_dir,
    and names what is missing or cannot be shipped."""
    bundle = _stage_bundle("vessa_foundation", tmp_path / "src", acdc_root)
    assert inference_data_paths(bundle) == {"template_bank": "template_bank"}
    assert inference_data_paths(REPO_ROOT / "bundles" / "vessa_ssl_acdc") == {}
    run = tmp_path / "run"
    run.mkdir()
    shutil.move(bundle / "template_bank", run / "template_bank")
    options = {"output_dir": tmp_path / "dist", "torchscript": False, "net_id": "segmenter"}
    missing_bank = "'template_bank' of configs/inference.json reads template_bank.*run_dir"
    with pytest.raises(BundleCheckError, match=missing_bank):
        export_model_zoo(bundle, **options)
    shutil.move(bundle / "models", run / "models")
    with pytest.raises(BundleCheckError, match=r"weights .*models/model.pt not found"):
        export_model_zoo(bundle, **options)
    wrong_net = "'network_def' of configs/inference.json does not match.*pass its id as net_id"
    with pytest.raises(BundleCheckError, match=wrong_net):
        export_model_zoo(bundle, run_dir=run, **{**options, "net_id": "network_def"})
    assert not list((tmp_path / "dist").glob("*.zip"))

    result = export_model_zoo(bundle, run_dir=run, **options)
    with zipfile.ZipFile(result.zip_path) as archive:
        assert archive.read("vessa_foundation/models/model.pt") == (run / "models" / "model.pt").read_bytes()
        shipped_index = archive.read("vessa_foundation/template_bank/index.json")
    assert shipped_index == (run / "template_bank" / "index.json").read_bytes()
    assert "template_bank/index.json" in result.files

    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["template_bank"] = str(tmp_path / "elsewhere")
    path.write_text(json.dumps(config))
    outside = "'template_bank' of configs/inference.json names .*not a path inside the bundle"
    with pytest.raises(BundleCheckError, match=outside):
        export_model_zoo(bundle, run_dir=run, **options)


def _break_license(bundle):
    (bundle / "LICENSE").unlink()


def _break_readme(bundle):
    (bundle / "docs" / "README.md").unlink()


def _break_version(bundle):
    _edit_metadata(bundle, version="9.9.9")


def _break_required_key(bundle):
    _edit_metadata(bundle, task=None)


def _break_tensor_spec(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = "one"
    _edit_metadata(bundle, network_data_format=meta["network_data_format"])


def _break_json(bundle):
    path = bundle / "configs" / "metadata.json"
    path.write_text(path.read_text()[:-20])


def _break_schema_url(bundle):
    _edit_metadata(bundle, schema="https://example.org/meta_schema_unknown.json")


def _break_output_channels(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 3
    _edit_metadata(bundle, network_data_format=meta["network_data_format"])


def _break_weights(bundle):
    (bundle / "models" / "model.pt").unlink()


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_break_license, r"necessary file\(s\) missing: \['LICENSE'\]"),
        (_break_readme, r"necessary file\(s\) missing: \['docs/README.md'\]"),
        (_break_version, r"version '9.9.9' is not in 'changelog'"),
        (_break_required_key, r"metadata.json: does not follow meta_schema_20240725.json: 'task' is a required property"),
        (_break_tensor_spec, r"does not follow meta_schema_20240725.json: 'one' is not of type 'integer'"),
        (_break_json, r"metadata.json: not valid JSON"),
        (_break_schema_url, r"no shipped schema for 'https://example.org/meta_schema_unknown.json'"),
        (_break_output_channels, r"'network_def' of configs/inference.json does not match network_data_format.*output channel number `4`"),
        (_break_weights, r"weights .*models/model.pt not found"),
    ],
)
def test_model_zoo_failures_name_the_problem(tmp_path, breakage, message):
    bundle = _stage_bundle("vessa_ssl_acdc", tmp_path / "src")
    breakage(bundle)
    with pytest.raises(BundleCheckError, match=message):
        export_model_zoo(bundle, output_dir=tmp_path / "dist")
    assert not list((tmp_path / "dist").glob("*.zip")), "no release is written when a check fails"


def test_without_torchscript_the_readme_must_say_so(tmp_path):
    bundle = _stage_bundle("vessa_ssl_acdc", tmp_path / "src")
    (bundle / "docs" / "README.md").write_text("# a bundle\n\nNo word about export formats.\n")
    with pytest.raises(BundleCheckError, match="docs/README.md does not say"):
        export_model_zoo(bundle, output_dir=tmp_path / "dist", torchscript=False)


def test_large_weights_go_to_large_files_yml(tmp_path):
    bundle = _stage_bundle("vessa_ssl_acdc", tmp_path / "src")
    size_mb = (bundle / "models" / "model.pt").stat().st_size / 2**20
    limit = size_mb / 2  # the weights (and their TorchScript copy) are over it, the configs far below
    with pytest.raises(BundleCheckError, match="exceed max_file_mb.*pass large_files_url"):
        export_model_zoo(bundle, output_dir=tmp_path / "dist", max_file_mb=limit)

    url = "https://example.org/releases/vessa_ssl_acdc"
    result = export_model_zoo(bundle, output_dir=tmp_path / "dist", max_file_mb=limit, large_files_url=url)
    assert result.large_files == ["models/model.pt", "models/model.ts"]
    with zipfile.ZipFile(result.zip_path) as archive:
        names = set(archive.namelist())
        listed = yaml.safe_load(archive.read("vessa_ssl_acdc/large_files.yml"))["large_files"]
    assert "vessa_ssl_acdc/models/model.pt" not in names and "vessa_ssl_acdc/large_files.yml" in names
    upload_dir = tmp_path / "dist" / f"vessa_ssl_acdc_v{result.version}_large_files"
    for entry in listed:
        uploaded = upload_dir / entry["path"]
        assert entry["url"] == f"{url}/{entry['path']}" and entry["hash_type"] == "sha256"
        assert entry["hash_val"] == hashlib.sha256(uploaded.read_bytes()).hexdigest()
    assert (upload_dir / "models" / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()


@pytest.mark.slow
def test_export_tool_command_line(tmp_path):
    bundle = _stage_bundle("vessa_ssl_acdc", tmp_path / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "export_model_zoo.py"), str(bundle), "--output_dir", str(tmp_path / "dist")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "passed: necessary files, version in changelog, metadata schema" in ok.stdout
    assert list((tmp_path / "dist").glob("vessa_ssl_acdc_v*.zip"))


@pytest.mark.slow
def test_export_tool_command_line_foundation_run(tmp_path, acdc_root):
    """The bundle README's command: weights and bank of a run folder, in/out check on segmenter, no TorchScript."""
    bundle = _stage_bundle("vessa_foundation", tmp_path / "src", acdc_root)
    run = tmp_path / "run"
    run.mkdir()
    for sub in ("models", "template_bank"):
        shutil.move(bundle / sub, run / sub)
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "export_model_zoo.py"), str(bundle), "--run_dir", str(run),
        "--torchscript", "False", "--net_id", "segmenter", "--output_dir", str(tmp_path / "dist"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    checks = "necessary files, version in changelog, metadata schema, inference properties, network in/out"
    assert f"passed: {checks}\n" in ok.stdout
    (zip_path,) = (tmp_path / "dist").glob("vessa_foundation_v*.zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert "vessa_foundation/template_bank/index.json" in archive.namelist()


def test_included_folder_is_checked_and_shipped(tmp_path):
    bundle = _stage_bundle("vessa_ssl_acdc", tmp_path / "src")
    with pytest.raises(BundleCheckError, match="included path .*template_bank not found"):
        export_model_zoo(bundle, output_dir=tmp_path / "dist", include=["template_bank"])
    (bundle / "template_bank").mkdir()
    (bundle / "template_bank" / "index.json").write_text("{}")
    result = export_model_zoo(bundle, output_dir=tmp_path / "dist", include=["template_bank"])
    with zipfile.ZipFile(result.zip_path) as archive:
        assert archive.read("vessa_ssl_acdc/template_bank/index.json") == b"{}"
