"""The twisted_rt benchmark: run it with C{python -m bench} (see README.md)."""
