# -*- test-case-name: tests.test_testing -*-
"""
Test helpers: the one in-memory broker every unit test uses (filled in by issue 14).

No module of the package imports this one (the import contract in C{setup.cfg}).
"""
