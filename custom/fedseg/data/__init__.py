"""Datasets of fedseg (FLamby style: one module per dataset with the same shape).

* :mod:`fedseg.data.config` -- site-local data configuration (``local/fedseg_data.json``,
  ``$FEDSEG_DATA_CONFIG``, built-in synthetic data), :func:`~fedseg.data.config.resolve_data_source`.
* :mod:`fedseg.data.splits` -- split files (centre -> train/val/test case ids, site -> centre); the packaged
  FedGS LiTS split ``splits/lits_paper.json``.
* :mod:`fedseg.data.lits` -- LiTS NIfTI reader, difficulty manifest, cache and torch Dataset.
* :mod:`fedseg.data.synthetic` -- writer of synthetic LiTS-format data with controlled heterogeneity.
* :mod:`fedseg.data.transforms` -- batched augmentation on tensors.
* :mod:`fedseg.data.scan` -- inverse-area histograms and summaries (``fedseg data scan``).
* :mod:`fedseg.data.polypgen` -- PolypGen JPEG reader, 5-fold split files, difficulty manifest, cache and Dataset.
* :mod:`fedseg.data.synthetic_polypgen` -- writer of synthetic PolypGen-format frames and masks (six centres).
* :mod:`fedseg.data.scan_polypgen` -- PolypGen small-polyp histograms (``fedseg data scan polypgen``).
* :mod:`fedseg.data.cache` -- the on-disk cache protocol shared by the readers (locks, fingerprints, row views).
* :mod:`fedseg.data.dataset` -- the torch Dataset base class of the LiTS and PolypGen datasets (sample access).

Submodules are imported on demand (torch is only needed by ``lits``, ``polypgen``, ``dataset`` and ``transforms``).
"""
