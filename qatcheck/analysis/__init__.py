"""Analyses over built artifacts and backends (not build steps):

* :mod:`qatcheck.analysis.sensitivity` - per-layer sensitivity profile and budgeted choice of the
  layers to keep in higher precision;
* :mod:`qatcheck.analysis.keeplist` - the keep-list file a recipe reads;
* :mod:`qatcheck.analysis.sensitivity_report` - the profile's JSON / PNG reports and CLI table.
"""
