"""PACS connectivity: a DICOMweb client (QIDO-RS / WADO-RS / STOW-RS) and a DIMSE storage listener.

* :func:`medseg.pacs.dicomweb.run_study` (``medseg pacs run``): retrieve a series of a study from a
  DICOMweb server, segment it and store the DICOM SEG back in the same study.
* :class:`medseg.pacs.listener.Listener` (``medseg pacs listen``): a C-STORE SCP that writes each
  received instance to disk before acknowledging it, segments a series once every association that
  delivered to it has ended and it has been quiet since (:mod:`medseg.pacs.associations`), forwards the
  SEG by C-STORE, and answers instances that arrive later with a revision SEG built from all instances;
  :class:`medseg.pacs.journal.Journal` makes restarts (also after SIGKILL) finish pending series exactly
  once.
* :func:`medseg.pacs.job.segment_series_folder`: the job both run (a folder of one series -> SEG).

The names are in ``__init__.pyi``; each is imported from its module on first use, so that importing
one module of this package does not load the others (nor torch or MONAI with them).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
