# -*- test-case-name: tests.test_web -*-
"""
The one module that may touch Twisted's private names (filled in by issue 14).
"""
