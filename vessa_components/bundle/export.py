"""Model Zoo form: the checks the MONAI Model Zoo's CI runs on a bundle, and its release zip.

The Model Zoo's CI (``ci/verify_bundle.py``) checks, for a bundle folder: the necessary files, that ``version`` is a
key of ``changelog``, ``monai.bundle.verify_metadata`` against the schema named in ``metadata.json``,
``monai.bundle.verify_net_in_out`` for ``network_def`` of ``configs/inference.json``, and ``monai.bundle.ckpt_export``
to TorchScript with the exported file loaded back (the Model Zoo's ``custom_net_config_dict`` may name another
``net_id`` for both, and its ``exclude_verify_torchscript_list`` skips the export for networks that cannot be
scripted). :func:`export_model_zoo` runs the same checks on a staged copy of the bundle (so what is checked is exactly
what is shipped) and writes ``<name>_v<version>.zip`` with the bundle folder at its root, as the MONAI Bundle
Specification's archive format asks. Data that training writes into the bundle and inference reads (a template bank,
named by the inference config's ``template_bank``) is shipped too.

The published schema cannot be downloaded here, so the schema files are shipped in ``vessa_components/bundle/schema``
under the file name of the URL they stand for; ``verify_metadata`` is given that file, which it then does not download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from ..utils.io import atomic_path

__all__ = [
    "BUNDLE_DATA_IDS",
    "NECESSARY_FILES",
    "SCHEMA_DIR",
    "BundleCheckError",
    "ModelZooExport",
    "check_inference_properties",
    "check_metadata_schema",
    "check_necessary_files",
    "check_network_in_out",
    "check_torchscript",
    "check_version_changelog",
    "export_model_zoo",
    "inference_data_paths",
    "load_metadata",
    "schema_file_for",
]

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
"""Shipped copies of the bundle metadata schemas, named as the last part of their URL."""

NECESSARY_FILES: tuple[str, ...] = ("configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md")
"""Files every bundle must have (the Model Zoo's necessary and preferred files, and the README it asks for)."""

BUNDLE_DATA_IDS: tuple[str, ...] = ("template_bank",)
"""Ids of an inference config that name data training writes under the bundle's ``output_dir`` and inference reads
from ``bundle_root`` (vessa_foundation's template bank): a release ships what they name."""

META_FILE = "configs/metadata.json"
INFERENCE_FILE = "configs/inference.json"
MODEL_FILE = "models/model.pt"
TS_FILE = "models/model.ts"
LARGE_FILES = "large_files.yml"
# files in the zip get a fixed time stamp so that a release of the same content is byte-identical (as the Model Zoo's
# compress step does with `touch -t 202205300000`)
_ZIP_DATE = (2022, 5, 30, 0, 0, 0)


class BundleCheckError(ValueError):
    """A bundle fails one of the Model Zoo checks; the message names the bundle, the file and the problem."""


@dataclass
class ModelZooExport:
    """What :func:`export_model_zoo` checked and wrote.

    Attributes:
        bundle: bundle name (the folder name).
        version: ``version`` of ``metadata.json``.
        changes: the ``changelog`` entry of that version.
        zip_path: the release zip.
        files: paths inside the zip, relative to its bundle folder.
        large_files: paths (relative to the bundle) too large to ship, listed in ``large_files.yml`` and written next
            to the zip under ``<name>_v<version>_large_files/`` for upload.
        checks: names of the checks that passed, in order.
    """

    bundle: str
    version: str
    changes: str
    zip_path: Path
    files: list[str] = field(default_factory=list)
    large_files: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


def load_metadata(meta_file: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` as a dict, with a clear error when it is missing or not a JSON object."""
    meta_file = Path(meta_file)
    if not meta_file.is_file():
        raise BundleCheckError(f"{meta_file}: metadata file not found")
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise BundleCheckError(f"{meta_file}: not valid JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise BundleCheckError(f"{meta_file}: must hold a JSON object, not {type(metadata).__name__}")
    return metadata


def schema_file_for(schema_url: str, schema_dir: str | os.PathLike = SCHEMA_DIR) -> Path:
    """The shipped schema file standing for ``schema_url`` (matched by the URL's last part)."""
    path = Path(schema_dir) / schema_url.rstrip("/").rsplit("/", 1)[-1]
    if not path.is_file():
        shipped = sorted(p.name for p in Path(schema_dir).glob("*.json"))
        raise BundleCheckError(
            f"no shipped schema for '{schema_url}' in {schema_dir} (shipped: {shipped}); point 'schema' of "
            "metadata.json at one of them, or add the schema file there"
        )
    return path


def check_necessary_files(bundle_dir: str | os.PathLike, files: Sequence[str] = NECESSARY_FILES) -> None:
    """Every file of ``files`` exists in ``bundle_dir``."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleCheckError(f"{bundle_dir}: bundle folder not found")
    missing = [f for f in files if not (bundle_dir / f).is_file()]
    if missing:
        raise BundleCheckError(f"bundle {bundle_dir.name} ({bundle_dir}): necessary file(s) missing: {missing}")


def check_version_changelog(meta_file: str | os.PathLike) -> tuple[str, str]:
    """``version`` and ``changelog`` are present and the version is a key of the changelog.

    Returns:
        the version and its changelog entry.
    """
    metadata = load_metadata(meta_file)
    for key in ("version", "changelog"):
        if key not in metadata:
            raise BundleCheckError(f"{meta_file}: '{key}' is missing")
    version, changelog = metadata["version"], metadata["changelog"]
    if not isinstance(changelog, dict):
        raise BundleCheckError(f"{meta_file}: 'changelog' must map versions to descriptions")
    if version not in changelog:
        raise BundleCheckError(
            f"{meta_file}: version {version!r} is not in 'changelog' (its versions: {sorted(changelog)}); "
            "add an entry describing what changed"
        )
    return str(version), str(changelog[version])


def check_metadata_schema(meta_file: str | os.PathLike, schema_dir: str | os.PathLike = SCHEMA_DIR) -> Path:
    """``monai.bundle.verify_metadata`` against the shipped schema named by ``schema`` of the metadata.

    Returns:
        the schema file used.
    """
    metadata = load_metadata(meta_file)
    if "schema" not in metadata:
        raise BundleCheckError(f"{meta_file}: 'schema' (the URL of its metadata schema) is missing")
    schema = schema_file_for(str(metadata["schema"]), schema_dir)
    try:
        # the schema file exists, so verify_metadata validates against it without downloading
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    except ValueError as e:
        raise BundleCheckError(f"{meta_file}: does not follow {schema.name}: {e}") from e
    return schema


def inference_data_paths(
    bundle_dir: str | os.PathLike, config_file: str = INFERENCE_FILE, ids: Sequence[str] = BUNDLE_DATA_IDS
) -> dict[str, str]:
    """The data the inference config reads from the bundle folder: ``{id: bundle-relative path}`` for each id of
    ``ids`` that ``config_file`` defines with a non-empty value (evaluated with ``bundle_root`` = ``bundle_dir``).

    Raises:
        BundleCheckError: the config cannot be read, or such an id names a path outside the bundle folder (a release
            can only ship what is under ``bundle_root``).
    """
    bundle_dir = Path(bundle_dir).resolve()
    parser = ConfigParser()
    try:
        parser.read_config(str(bundle_dir / config_file))
    except Exception as e:
        raise BundleCheckError(
            f"bundle {bundle_dir.name}: {config_file} cannot be read: {type(e).__name__}: {e}"
        ) from e
    present = [i for i in ids if i in parser]
    if not present:
        return {}
    parser["bundle_root"] = str(bundle_dir)
    paths: dict[str, str] = {}
    for data_id in present:
        try:
            value = parser.get_parsed_content(data_id)
        except Exception as e:
            raise BundleCheckError(
                f"bundle {bundle_dir.name}: '{data_id}' of {config_file} cannot be evaluated: {type(e).__name__}: {e}"
            ) from e
        if not value:
            continue
        path = (bundle_dir / str(value)).resolve()
        if not path.is_relative_to(bundle_dir) or path == bundle_dir:
            raise BundleCheckError(
                f"bundle {bundle_dir.name}: '{data_id}' of {config_file} names {value}, not a path inside the bundle "
                f"folder; a release ships only what is under bundle_root (write it as \"$@bundle_root + '/...'\")"
            )
        paths[data_id] = path.relative_to(bundle_dir).as_posix()
    return paths


def check_network_in_out(
    bundle_dir: str | os.PathLike,
    config_file: str = INFERENCE_FILE,
    net_id: str = "network_def",
    device: str = "cpu",
) -> None:
    """``monai.bundle.verify_net_in_out``: ``net_id`` of ``config_file`` takes the input of ``network_data_format``
    and returns its output channels and dtype."""
    bundle_dir = Path(bundle_dir)
    try:
        verify_net_in_out(
            net_id=net_id,
            meta_file=str(bundle_dir / META_FILE),
            config_file=str(bundle_dir / config_file),
            device=device,
            bundle_root=str(bundle_dir),
        )
    except Exception as e:  # any failure to build or run the network is a failed check, reported with its cause
        raise BundleCheckError(
            f"bundle {bundle_dir.name}: '{net_id}' of {config_file} does not match network_data_format of "
            f"{META_FILE}: {type(e).__name__}: {e} (if network_data_format describes another network of the config, "
            "pass its id as net_id, as the Model Zoo's custom_net_config_dict does)"
        ) from e


def check_inference_properties(bundle_dir: str | os.PathLike, config_file: str = INFERENCE_FILE) -> None:
    """The inference config defines what MONAI's inference workflow (and MONAI Label's bundle app) needs."""
    bundle_dir = Path(bundle_dir)
    try:
        workflow = ConfigWorkflow(
            config_file=str(bundle_dir / config_file),
            meta_file=str(bundle_dir / META_FILE),
            workflow_type="infer",
            bundle_root=str(bundle_dir),
            logging_file=False,
        )
        workflow.initialize()
        missing = workflow.check_properties()
    except Exception as e:
        raise BundleCheckError(f"bundle {bundle_dir.name}: {config_file} cannot be parsed: {type(e).__name__}: {e}") from e
    if missing:
        raise BundleCheckError(f"bundle {bundle_dir.name}: {config_file} lacks required inference properties {missing}")


def _fake_input(metadata: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """A random batch of one input as ``network_data_format`` describes it ('*' and expressions sized 1 * 16)."""
    spec = next(iter(metadata["network_data_format"]["inputs"].values()))
    shape = [s if isinstance(s, int) else 16 for s in spec["spatial_shape"]]
    return torch.rand((1, spec["num_channels"], *shape), generator=generator)


def check_torchscript(
    bundle_dir: str | os.PathLike,
    ts_file: str | os.PathLike,
    ckpt_file: str | os.PathLike | None = None,
    config_file: str = INFERENCE_FILE,
    net_id: str = "network_def",
    atol: float = 1e-4,
) -> None:
    """``monai.bundle.ckpt_export`` of ``net_id`` with the weights of ``ckpt_file`` to ``ts_file``, then the file is
    loaded back with ``torch.jit.load`` and must give the eager network's output (within ``atol``) on an input of the
    metadata's shape."""
    bundle_dir = Path(bundle_dir)
    ckpt_file = Path(ckpt_file) if ckpt_file is not None else bundle_dir / MODEL_FILE
    meta_file, config = bundle_dir / META_FILE, bundle_dir / config_file
    try:
        ckpt_export(
            net_id=net_id,
            filepath=str(ts_file),
            ckpt_file=str(ckpt_file),
            meta_file=str(meta_file),
            config_file=str(config),
            bundle_root=str(bundle_dir),
        )
    except Exception as e:
        raise BundleCheckError(
            f"bundle {bundle_dir.name}: ckpt_export of '{net_id}' to TorchScript failed ({type(e).__name__}: {e}); "
            "if the network cannot be scripted, export with torchscript=False and say so in docs/README.md"
        ) from e
    try:
        scripted = torch.jit.load(str(ts_file), map_location="cpu")
    except Exception as e:
        raise BundleCheckError(f"{ts_file}: the exported TorchScript file does not load back: {e}") from e

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_dir)
    network = parser.get_parsed_content(net_id).to("cpu")
    network.load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    network.eval()
    scripted.eval()
    x = _fake_input(load_metadata(meta_file), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = network(x), scripted(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol):
        raise BundleCheckError(f"{ts_file}: the TorchScript module's output differs from the eager '{net_id}' output")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stage(bundle_dir: Path, stage: Path, ckpt_file: Path, extra: dict[str, Path]) -> None:
    """Copy what a release holds (configs, docs, LICENSE, the weights, the ``extra`` paths: bundle-relative path ->
    source) into ``stage``."""
    ignore = shutil.ignore_patterns(".*", "__pycache__")
    for rel, src in extra.items():
        if not src.exists():
            raise BundleCheckError(f"bundle {bundle_dir.name}: included path {src} not found")
        if src.is_dir():
            shutil.copytree(src, stage / rel, ignore=ignore)
        else:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, stage / rel)
    shutil.copytree(bundle_dir / "configs", stage / "configs", ignore=ignore)
    shutil.copytree(bundle_dir / "docs", stage / "docs", ignore=ignore)
    shutil.copy2(bundle_dir / "LICENSE", stage / "LICENSE")
    (stage / "models").mkdir()
    shutil.copy2(ckpt_file, stage / MODEL_FILE)


def export_model_zoo(
    bundle_dir: str | os.PathLike,
    output_dir: str | os.PathLike = "dist",
    ckpt_file: str | os.PathLike | None = None,
    torchscript: bool = True,
    device: str = "cpu",
    max_file_mb: float = 25.0,
    large_files_url: str = "",
    include: Sequence[str] = (),
    net_id: str = "network_def",
    run_dir: str | os.PathLike | None = None,
) -> ModelZooExport:
    """Run the Model Zoo's checks on ``bundle_dir`` and write its release zip to ``output_dir``.

    Args:
        bundle_dir: the bundle folder (its name is the bundle's name).
        output_dir: where ``<name>_v<version>.zip`` (and any large files) are written.
        ckpt_file: the weights (a flat ``state_dict`` of ``network_def``); default ``<run_dir>/models/model.pt``.
        torchscript: export and check ``models/model.ts``; ``False`` for networks that cannot be scripted, in which
            case ``docs/README.md`` must say so (it must mention TorchScript), as the Model Zoo asks.
        device: device for the network in/out check.
        max_file_mb: files larger than this (MB) are not put in the zip but listed in ``large_files.yml`` (the Model
            Zoo keeps large weights out of its repository and downloads them from the listed URL).
        large_files_url: base URL where the large files will be uploaded; required when there are any.
        include: further bundle-relative files or folders (taken from ``bundle_dir``) that the release ships.
        net_id: the network of the inference config that ``network_data_format`` describes, for the in/out check and
            the TorchScript export (as the Model Zoo's ``custom_net_config_dict``); the export loads the weights into
            it, so with ``torchscript`` they must be its ``state_dict``.
        run_dir: the folder training wrote to (``output_dir`` of train.json); default ``bundle_dir`` (a bundle trained
            in place). The weights (unless ``ckpt_file``) and the data the inference config reads from the bundle (the
            ids of :data:`BUNDLE_DATA_IDS` it defines, e.g. ``template_bank/``) are taken from there and shipped.

    Returns:
        what was checked and written.
    """
    bundle_dir = Path(bundle_dir).resolve()
    name = bundle_dir.name
    checks: list[str] = []

    check_necessary_files(bundle_dir)
    checks.append("necessary files")
    run_dir = Path(run_dir).resolve() if run_dir is not None else bundle_dir
    if not run_dir.is_dir():
        raise BundleCheckError(f"bundle {name}: run_dir {run_dir} not found")
    ckpt_path = Path(ckpt_file) if ckpt_file is not None else run_dir / MODEL_FILE
    if not ckpt_path.is_file():
        raise BundleCheckError(
            f"bundle {name}: weights {ckpt_path} not found; train the bundle (it writes models/model.pt) and pass its "
            "output_dir as run_dir, or pass ckpt_file"
        )
    extra: dict[str, Path] = {}
    for data_id, rel in inference_data_paths(bundle_dir).items():
        if not (run_dir / rel).exists():
            raise BundleCheckError(
                f"bundle {name}: '{data_id}' of {INFERENCE_FILE} reads {rel}, which training writes, but "
                f"{run_dir / rel} is not there; pass the training run's output_dir as run_dir"
            )
        extra[rel] = run_dir / rel
    extra.update({rel: bundle_dir / rel for rel in ([include] if isinstance(include, str) else include)})
    version, changes = check_version_changelog(bundle_dir / META_FILE)
    checks.append("version in changelog")
    if not torchscript and "torchscript" not in (bundle_dir / "docs" / "README.md").read_text().lower():
        raise BundleCheckError(
            f"bundle {name}: exported without TorchScript, but docs/README.md does not say that (or why) the network "
            "cannot be exported to TorchScript"
        )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=f".{name}.") as tmp:
        stage = Path(tmp) / name
        _stage(bundle_dir, stage, ckpt_path, extra)
        check_metadata_schema(stage / META_FILE)
        checks.append("metadata schema")
        check_inference_properties(stage)
        checks.append("inference properties")
        check_network_in_out(stage, net_id=net_id, device=device)
        checks.append("network in/out")
        if torchscript:
            check_torchscript(stage, stage / TS_FILE, net_id=net_id)
            checks.append("torchscript export and load")

        large = [p for p in sorted(stage.rglob("*")) if p.is_file() and p.stat().st_size > max_file_mb * 2**20]
        large_rel = [p.relative_to(stage).as_posix() for p in large]
        if large:
            if not large_files_url:
                sizes = {r: f"{p.stat().st_size / 2**20:.1f} MB" for r, p in zip(large_rel, large)}
                raise BundleCheckError(
                    f"bundle {name}: {sizes} exceed max_file_mb={max_file_mb}; pass large_files_url (where they will be "
                    f"uploaded) so that they are listed in {LARGE_FILES} instead of shipped"
                )
            entries = []
            upload_dir = output_dir / f"{name}_v{version}_large_files"
            for rel, path in zip(large_rel, large):
                entries.append(
                    {"path": rel, "url": f"{large_files_url.rstrip('/')}/{rel}", "hash_val": _sha256(path), "hash_type": "sha256"}
                )
                (upload_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, upload_dir / rel)
            (stage / LARGE_FILES).write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))

        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        zip_path = output_dir / f"{name}_v{version}.zip"
        with atomic_path(zip_path) as tmp_zip:
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.comment = f"{name} {version}: {changes}".encode()[:65535]
                for rel in files:
                    info = zipfile.ZipInfo(f"{name}/{rel}", date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, (stage / rel).read_bytes())
    return ModelZooExport(
        bundle=name, version=version, changes=changes, zip_path=zip_path, files=files, large_files=large_rel, checks=checks
    )
