"""tokenwire's benchmark (``make bench``: ``bench/run.py``), its tools and its experiments.

Every file is a module of this package, run from the repository root with ``python -m bench.<name>``
(``bench/experiments/`` holds the one-off experiments, indexed in its README).
"""
