"""The ``hypervocab`` command line."""
