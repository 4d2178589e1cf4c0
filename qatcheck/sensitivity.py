"""Compatibility module: ``from qatcheck.sensitivity import ...`` keeps working.

Sensitivity was split by job; new code imports from where things live now:

* profile, budget search and suite check (:class:`Budget`, :class:`Profile`,
  :class:`SensitivityRunner`, :func:`profile`, :func:`choose_layers`,
  :func:`check_keep_precision`, :func:`with_calibrator`) - :mod:`qatcheck.analysis.sensitivity`;
* the keep-list file (:class:`KeepList`, :func:`keep_list`, :func:`write_keep_list`,
  :func:`load_keep_list`) - :mod:`qatcheck.analysis.keeplist`;
* reports and the CLI table (:func:`write_reports`, :func:`report_stem`, :func:`table_rows`) -
  :mod:`qatcheck.analysis.sensitivity_report`;
* Q/DQ graph editing (:func:`quantized_layers`, :func:`strip_qdq`) -
  :mod:`qatcheck.quantize.qdq_edit`.
"""
from qatcheck.analysis.keeplist import KeepList, keep_list, load_keep_list, write_keep_list
from qatcheck.analysis.sensitivity import (PATH_MODE, PATHS, Budget, BudgetResult, BudgetStep,
                                           LayerSensitivity, Profile, SensitivityRunner,
                                           check_keep_precision, choose_layers, profile,
                                           with_calibrator)
from qatcheck.analysis.sensitivity_report import report_stem, table_rows, write_reports
from qatcheck.quantize.qdq_edit import quantized_layers, strip_qdq

__all__ = ["Budget", "BudgetResult", "BudgetStep", "LayerSensitivity", "Profile", "PATHS",
           "PATH_MODE", "SensitivityRunner", "profile", "choose_layers", "check_keep_precision",
           "with_calibrator", "KeepList", "keep_list", "write_keep_list", "load_keep_list",
           "report_stem", "write_reports", "table_rows", "quantized_layers", "strip_qdq"]
