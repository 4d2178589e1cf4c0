# Top-level conftest: the qatcheck plugin loads through its pytest11 entry point (pip install -e .).
# Tests of the plugin itself use pytester.
pytest_plugins = ["pytester"]
