"""Runnable experiments: `python -m experiments.<name> [--flags]`.

Each module's docstring says what it reproduces, on what hardware, and in how long.
"""
