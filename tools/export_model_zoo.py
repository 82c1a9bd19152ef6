"""Check a bundle the way the MONAI Model Zoo's CI does and write its release zip.

Checks: necessary files (configs/metadata.json, configs/inference.json, LICENSE, docs/README.md), ``version`` in
``changelog``, ``verify_metadata`` against the schema shipped in ``vessa_components/bundle/schema``,
``ConfigWorkflow(...).check_properties()`` for inference, ``verify_net_in_out`` for ``network_def`` (or ``--net_id``),
``ckpt_export`` to TorchScript and the exported file loaded back. Writes ``<output_dir>/<name>_v<version>.zip``
(configs, docs, LICENSE, models/model.pt, models/model.ts, the data the inference config reads from the bundle such as
``template_bank/`` and, for weights over ``--max_file_mb``, a ``large_files.yml``).

Examples::

    python tools/export_model_zoo.py bundles/vessa_ssl_acdc --ckpt_file runs/acdc3/models/model.pt --output_dir dist
    # weights and template bank of a training run; VESSA cannot be scripted, its in/out check runs on `segmenter`
    python tools/export_model_zoo.py bundles/vessa_foundation --run_dir runs/vessa_acdc3 --torchscript False \
        --net_id segmenter --output_dir dist
"""

from __future__ import annotations

import sys

import fire

from vessa_components.bundle import BundleCheckError, export_model_zoo


def main(
    bundle: str,
    output_dir: str = "dist",
    ckpt_file: str | None = None,
    torchscript: bool = True,
    device: str = "cpu",
    max_file_mb: float = 25.0,
    large_files_url: str = "",
    include: str | tuple[str, ...] = (),
    net_id: str = "network_def",
    run_dir: str | None = None,
) -> None:
    """Run the Model Zoo checks on the bundle folder ``bundle`` and write its release zip; exit 1 with the reason when
    a check fails.

    Args:
        bundle: the bundle folder, e.g. ``bundles/vessa_ssl_acdc``.
        output_dir: where the zip (and any large files to upload) go.
        ckpt_file: weights to ship (flat ``state_dict`` of ``network_def``); default ``<run_dir>/models/model.pt``.
        torchscript: ``False`` for networks that cannot be scripted (the bundle README must say so).
        device: device of the network in/out check.
        max_file_mb: larger files are listed in ``large_files.yml`` instead of shipped.
        large_files_url: base URL where those files will be uploaded.
        include: further bundle-relative files or folders to check with and ship (comma-separated).
        net_id: the network of ``configs/inference.json`` that ``network_data_format`` describes (in/out check and
            TorchScript export), as the Model Zoo's ``custom_net_config_dict``.
        run_dir: the training run's ``output_dir``: its ``models/model.pt`` (unless ``ckpt_file``) and the data the
            inference config reads (``template_bank/``) are shipped; default the bundle folder.
    """
    try:
        result = export_model_zoo(
            bundle,
            output_dir=output_dir,
            ckpt_file=ckpt_file,
            torchscript=torchscript,
            device=device,
            max_file_mb=max_file_mb,
            large_files_url=large_files_url,
            include=include.split(",") if isinstance(include, str) else include,
            net_id=net_id,
            run_dir=run_dir,
        )
    except BundleCheckError as e:
        print(f"Model Zoo check failed: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{result.bundle} {result.version}: {result.changes}")
    print("passed: " + ", ".join(result.checks))
    print(f"wrote {result.zip_path} ({len(result.files)} files)")
    for rel in result.large_files:
        print(f"large file {rel}: upload it from {result.zip_path.parent / f'{result.bundle}_v{result.version}_large_files' / rel}")


if __name__ == "__main__":
    fire.Fire(main)
