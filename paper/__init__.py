"""The paper's tables as library code under ``tools/paper_tables.py``: Table 5, the ablation
(``ablation``), and Table 4, personalized aesthetics (``personalize``)."""
