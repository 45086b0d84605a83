"""The meta-dataset generator's command line (:func:`metafit.hpo.metadataset.main`).

    python -m metafit.hpo.make_metadataset --out runs/hpo_metadataset_v2 --configs 30   # resumable
    python -m metafit.hpo.make_metadataset --pack runs/hpo_metadataset_v2 --configs 30  # -> the packaged file

A module of its own because ``import metafit.hpo`` imports :mod:`metafit.hpo.metadataset`:
``python -m metafit.hpo.metadataset`` would execute a module already imported under that name
(runpy warns; the module then exists twice, with two copies of its globals).
"""
from metafit.hpo.metadataset import main

if __name__ == "__main__":
    raise SystemExit(main())
