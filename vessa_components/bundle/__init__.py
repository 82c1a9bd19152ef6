"""Bundle-level tools: the MONAI Model Zoo checks and release zip (:mod:`.export`)."""

from .export import (
    BUNDLE_DATA_IDS,
    NECESSARY_FILES,
    SCHEMA_DIR,
    BundleCheckError,
    ModelZooExport,
    check_inference_properties,
    check_metadata_schema,
    check_necessary_files,
    check_network_in_out,
    check_torchscript,
    check_version_changelog,
    export_model_zoo,
    inference_data_paths,
    load_metadata,
    schema_file_for,
)

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
