"""DICOM series input: discover, sort, validate and select image series; read them as SimpleITK images.

What PACS and CD/USB exports look like, and what this package does with it:

* a folder tree of mixed studies and series, files with or without ``.dcm`` (``IM000001``),
  recognised by content (``DICM`` after the 128-byte preamble, or a data set without preamble that
  pydicom reads and that holds UIDs); stray non-DICOM files are skipped and listed in
  :attr:`DicomScan.skipped`; a DICOMDIR is read and its references checked (``scan_dicom`` of a
  DICOMDIR file reads exactly the files it references) -- :mod:`.scan`, :mod:`.headers`;
* instances grouped by SeriesInstanceUID and sorted along the slice normal
  (``dot(ImagePositionPatient, row x column)``), never by InstanceNumber -- :mod:`.series`;
* each series checked for missing slices, uneven spacing, gantry tilt, mixed orientations, sizes
  or pixel spacings, conflicting duplicate instances (:mod:`.duplicates`), localizers, missing or
  truncated pixel data, geometry tags that are present but unusable (:mod:`.planes`, :mod:`.frames`: a
  PixelSpacing of 0, a NaN position, ...), the grid itself and transfer syntaxes no installed pydicom plugin
  decodes (blocking ones in :attr:`DicomSeries.problems`, harmless ones in :attr:`DicomSeries.notes`);
* enhanced (multi-frame) CT / MR read frame by frame from the functional groups -- :mod:`.pixels`;
* plane geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, the slice normal, pixel ->
  patient) in one module that the SEG / RTSTRUCT writers use too -- :mod:`.planes`;
* the ``medseg inspect`` report -- :mod:`.inspect`.

Scanning reads headers only (pixel data is skipped; its presence and length are checked from the
element header); pixel data is decoded by :func:`read_series` / :func:`source_datasets`. None of
these modules imports MONAI or torch.

Geometry (LPS, SimpleITK order): ``origin`` = ImagePositionPatient of the first sorted slice;
``direction`` columns = row direction, column direction, slice normal; ``spacing`` = (column spacing,
row spacing, measured slice step).

Typical use::

    scan = scan_dicom("export/")
    series = select_series(scan, modality="CT", min_slices=20)
    image = read_series(series)          # float32, HU for CT
"""

from medseg.io.dicom.inspect import describe_orientation, inspect_lines
from medseg.io.dicom.pixels import decode_series, read_series, source_datasets
from medseg.io.dicom.scan import NON_IMAGE_MODALITIES, DicomScan, is_dicom_input, scan_dicom
from medseg.io.dicom.select import select_series
from medseg.io.dicom.series import DicomSeries

__all__ = [
    "NON_IMAGE_MODALITIES",
    "DicomScan",
    "DicomSeries",
    "decode_series",
    "describe_orientation",
    "inspect_lines",
    "is_dicom_input",
    "read_series",
    "scan_dicom",
    "select_series",
    "source_datasets",
]
