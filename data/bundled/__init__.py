"""Bundled datasets: real images that installed packages ship, turned into shards and benchmark sets.

Not the data pipeline (``data/`` around this folder reads any shards); these builders make the default
run and the bundled benchmark work on a fresh machine with no download: the scikit-learn digits
(``digits.py``), multi-digit benchmark sets (``benchmark.py``), long-context albums (``longctx.py``),
the digit judge used by the benchmark's scorers (``judge.py``) and synthetic length mixes for packing
benchmarks (``mixes.py``).
"""
