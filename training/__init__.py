"""Training and evaluation under ``main_nni.py``: one epoch and one evaluation pass (``engine``), a run's
data sets from its options (``run_data``)."""
