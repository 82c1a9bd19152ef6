"""Data sets and splits: ACDC (raw challenge and SSL4MIS layouts), AbdomenCT-1K, synthetic demo data, datalists."""

from .acdc import (
    ACDC_CLASS_NAMES,
    ACDC_LABELS,
    FIXED_LABELED_CASES,
    SSL4MIS_TEST_PATIENTS,
    SSL4MIS_VAL_PATIENTS,
    patient_of,
)
from .abdomenct import (
    ABDOMENCT_CLASS_NAMES,
    ABDOMENCT_HU_WINDOW,
    ABDOMENCT_IMAGE_SUFFIX,
    ABDOMENCT_LABEL_SUFFIX,
    ABDOMENCT_LABELS,
    TOTALSEGMENTATOR_TO_ABDOMENCT1K,
    convert_abdomenct_to_slices,
    find_abdomenct_cases,
    load_abdomenct_case,
    make_abdomenct_datalist,
    resolve_label_map,
)
from .acdc_raw import AcdcCase, convert_acdc_raw_to_ssl4mis, list_raw_cases, load_raw_frame, read_info_cfg, split_patients
from .datalist import case_of, image_datalist, make_slice_datalist, read_list_file, volume_datalist, write_datalist
from .demo import SYNTHETIC_MARKER, make_demo_acdc
from .demo_abdomenct import make_demo_abdomenct
from .errors import DataError
from .h5 import LoadH5, LoadH5d, read_h5
from .prepare import DATA_LAYOUTS, abdomenct_folders, prepare_dataset
from .stage1 import foreground_class_names, resolve_datasets
from .splits import parse_labeled_cases, select_labeled_patients

__all__ = [
    "ABDOMENCT_CLASS_NAMES",
    "ABDOMENCT_HU_WINDOW",
    "ABDOMENCT_IMAGE_SUFFIX",
    "ABDOMENCT_LABEL_SUFFIX",
    "ABDOMENCT_LABELS",
    "TOTALSEGMENTATOR_TO_ABDOMENCT1K",
    "convert_abdomenct_to_slices",
    "find_abdomenct_cases",
    "load_abdomenct_case",
    "make_abdomenct_datalist",
    "resolve_label_map",
    "AcdcCase",
    "convert_acdc_raw_to_ssl4mis",
    "list_raw_cases",
    "load_raw_frame",
    "read_info_cfg",
    "split_patients",
    "SYNTHETIC_MARKER",
    "make_demo_acdc",
    "make_demo_abdomenct",
    "ACDC_CLASS_NAMES",
    "ACDC_LABELS",
    "FIXED_LABELED_CASES",
    "SSL4MIS_TEST_PATIENTS",
    "SSL4MIS_VAL_PATIENTS",
    "patient_of",
    "case_of",
    "image_datalist",
    "make_slice_datalist",
    "read_list_file",
    "volume_datalist",
    "write_datalist",
    "DataError",
    "LoadH5",
    "LoadH5d",
    "read_h5",
    "DATA_LAYOUTS",
    "abdomenct_folders",
    "prepare_dataset",
    "parse_labeled_cases",
    "select_labeled_patients",
    "foreground_class_names",
    "resolve_datasets",
]
