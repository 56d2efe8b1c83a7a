"""The ``toco`` command line: analysis, inspection, recompression, evaluation, probing, demo."""
