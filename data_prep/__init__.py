"""Dataset converters: raw downloads -> drkeras record shards + ``manifest.json``.

Command line: ``python -m data_prep <dataset> --src RAW --out RECORDS [--max-side N]
[--workers N]``; from Python: :func:`convert`. Each dataset has its own module (``idrid``,
``eyepacs``, ``messidor``, ``messidor2``, ``ddr``, ``diaretdb1``, ``aptos``) exposing
``add_arguments(parser)``, ``run(args) -> int`` and ``convert(src, out, **options) -> dict``;
``synthetic`` writes procedural layouts and converts them. Modules are imported only when used,
so the package imports quickly and one broken module does not break the others.
"""

from __future__ import annotations

import importlib

__all__ = ["DATASETS", "convert", "load"]

# Dataset name -> one-line description (kept here so `--help` needs no imports).
DATASETS = {
    "idrid": "IDRiD parts A (lesion segmentation) and B (grading)",
    "eyepacs": "Kaggle EyePACS 2015 (train; test split into val/test by retinopathy_solution.csv)",
    "messidor": "Messidor (12 bases + Annotation_Base*.xls; grades 0-3)",
    "messidor2": "Messidor-2 with the adjudicated grades of messidor_data.csv",
    "ddr": "DDR grading (grade 5 = ungradable) and lesion segmentation",
    "diaretdb1": "DiaRetDB1 v1.1 (soft lesion maps binarised at --confidence)",
    "aptos": "APTOS 2019 (train.csv graded, test.csv unlabeled)",
    "synthetic": "procedural fundus images in one of the real layouts, then converted",
}


def load(dataset: str):
    """Import and return the converter module of ``dataset``.

    Raises ``ValueError`` listing the known datasets for an unknown name.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return importlib.import_module(f"data_prep.{dataset}")


def convert(dataset: str, src, out, **kwargs) -> dict:
    """Convert the raw ``dataset`` in ``src`` into records in ``out``; return the manifest.

    Args:
        dataset: a key of :data:`DATASETS`.
        src: raw dataset root.
        out: output records folder.
        **kwargs: ``max_side``, ``workers`` and the dataset module's own options.

    Example::

        >>> import data_prep
        >>> data_prep.convert("idrid", "/data/IDRiD", "records/idrid")  # doctest: +SKIP
    """
    module = load(dataset)
    if not hasattr(module, "convert"):
        raise ValueError(f"data_prep.{dataset} has no programmatic convert()")
    return module.convert(src, out, **kwargs)
