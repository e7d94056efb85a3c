"""Helpers shared by several test files: builders of test inputs and small drivers.

The test files import these as ``helpers.<module>`` (pytest puts ``tests/`` on ``sys.path``
because ``tests/conftest.py`` has no package above it), so that no test file imports another
test file. The modules here hold no tests and no fixtures: fixtures live in ``conftest.py`` or
the test file that uses them.
"""
