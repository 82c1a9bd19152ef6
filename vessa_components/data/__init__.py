"""Data sets and splits: ACDC (raw challenge and SSL4MIS layouts), AbdomenCT-1K, synthetic demo data, datalists."""

from .acdc import (
    ACDC_CLASS_NAMES,
    ACDC_LABELS,
    FIXED_LABELED_CASES,
    SSL4MIS_TEST_PATIENTS,
    SSL4MIS_VAL_PATIENTS,
    patient_of,
)
from .datalist import case_of, make_slice_datalist, read_list_file, volume_datalist, write_datalist
from .errors import DataError
from .h5 import LoadH5, LoadH5d, read_h5
from .splits import parse_labeled_cases, select_labeled_patients

__all__ = [
    "ACDC_CLASS_NAMES",
    "ACDC_LABELS",
    "FIXED_LABELED_CASES",
    "SSL4MIS_TEST_PATIENTS",
    "SSL4MIS_VAL_PATIENTS",
    "patient_of",
    "case_of",
    "make_slice_datalist",
    "read_list_file",
    "volume_datalist",
    "write_datalist",
    "DataError",
    "LoadH5",
    "LoadH5d",
    "read_h5",
    "parse_labeled_cases",
    "select_labeled_patients",
]
