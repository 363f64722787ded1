"""The sections of bench.py, one file each; bench.py runs them."""
