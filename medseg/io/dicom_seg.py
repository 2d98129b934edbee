"""DICOM Segmentation (SEG) output with highdicom: one BINARY SEG instance per predicted series.

The SEG references the exact source instances (every one of them in ``ReferencedSeriesSequence``,
and the source slice of each frame in its ``DerivationImageSequence``), joins the source's study
(patient and study modules copied by highdicom), opens a new series, and describes one segment per
foreground label of the model with the label's name and SNOMED CT codes from the bundle's
``configs/metadata.json`` ``"segments"``, algorithm type AUTOMATIC and the algorithm's name and
version.

Choices (documented in the README):

* Segment type BINARY (LABELMAP needs a 2024 DICOM edition that dciodvfy and many viewers do not know).
* Every foreground label of the model is described, also when the prediction does not contain it
  (the segment then has no frames): a reader sees what the model looks for, and segment numbers
  equal the model's label values.
* Empty frames are omitted. A prediction without any foreground still gives a valid SEG (highdicom
  then stores all frames, empty), with a warning in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.coding import Code

from medseg.errors import BundleError, DicomError
from medseg.io.atomic import atomic_path
from medseg.io.dicom.planes import check_label_map, source_planes
from medseg.labels import label_colour_255, segment_code

__all__ = ["SEG_SERIES_DESCRIPTION", "complete_code", "segment_descriptions", "write_dicom_seg"]

log = logging.getLogger(__name__)

#: SeriesDescription of a DICOM SEG unless the caller gives one.
SEG_SERIES_DESCRIPTION = "medseg segmentation"

# --------------------------------------------------------------------------------------------
# Segment descriptions from the bundle metadata
# --------------------------------------------------------------------------------------------

def complete_code(entry: Any) -> dict[str, str] | None:
    """A ``{"code", "scheme", "meaning"}`` dict with all three set, or None."""
    if not isinstance(entry, Mapping):
        return None
    values = {key: str(entry.get(key) or "").strip() for key in ("code", "scheme", "meaning")}
    return values if all(values.values()) else None


def segment_descriptions(metadata: Mapping[str, Any], labels: Mapping[int, str], *, require_codes: bool = True,
                         source: str | os.PathLike[str] | None = None) -> dict[int, dict[str, Any]]:
    """The segments of a model: ``{label value: {"name", "snomed", "category"}}`` for every
    foreground label, from the bundle's ``metadata.json`` ``"segments"``.

    A label missing from ``"segments"`` (bundles made before segment metadata existed) gets the
    code medseg knows for its name (:func:`medseg.labels.segment_code`), with a warning.

    Parameters
    ----------
    metadata
        The parsed ``configs/metadata.json``.
    labels
        The model's labels (``plan.labels``: value -> name; 0 is background and skipped).
    require_codes
        Require a SNOMED CT property type and a category for every segment (DICOM SEG needs both;
        an RT structure set only needs names).
    source
        The metadata file, named in error messages.

    Raises
    ------
    BundleError
        A foreground label without a code (when ``require_codes``), or a ``"segments"`` entry
        whose name differs from the model's label name.
    """
    where = os.fspath(source) if source is not None else "metadata.json"
    segments = metadata.get("segments")
    entries: Mapping[str, Any] = segments if isinstance(segments, Mapping) else {}
    result: dict[int, dict[str, Any]] = {}
    for value, name in sorted(labels.items()):
        value = int(value)
        if value == 0:
            continue
        entry = entries.get(str(value))
        if not isinstance(entry, Mapping):
            log.warning("%s: no segments.%d entry for label %r; using medseg's code for the name", where, value, name)
            entry = segment_code(name)
        if entry.get("name") not in (None, name):
            raise BundleError(f"{where}: segments.{value}.name is {entry.get('name')!r}, "
                              f"but the model calls label {value} {name!r}")
        snomed, category = complete_code(entry.get("snomed")), complete_code(entry.get("category"))
        if require_codes and (snomed is None or category is None):
            key, what = ("snomed", "property type") if snomed is None else ("category", "category")
            raise BundleError(f"{where}: segment {value} ({name!r}) has no SNOMED CT {what} code, which DICOM SEG "
                              f"needs; set segments.{value}.{key} to {{\"code\", \"scheme\", \"meaning\"}}")
        result[value] = {"name": str(name), "snomed": snomed, "category": category}
    if not result:
        raise BundleError(f"{where}: the model has no foreground label to describe")
    return result


# --------------------------------------------------------------------------------------------
# SEG writer
# --------------------------------------------------------------------------------------------

def write_dicom_seg(label_map: np.ndarray, sources: Sequence[pydicom.Dataset], segments: Mapping[int, Mapping[str, Any]],
                    out_path: str | os.PathLike[str], *, algorithm_name: str, algorithm_version: str,
                    series_number: int = 900, series_description: str = SEG_SERIES_DESCRIPTION) -> Path:
    """Write ``label_map`` as one BINARY DICOM Segmentation instance of the source series' study.

    Parameters
    ----------
    label_map
        Integer array ``(slices, rows, columns)``: slice k is ``sources[k]`` for single-frame
        sources (for one multi-frame source, its k-th frame along the slice normal, see
        :func:`medseg.io.dicom.planes.source_planes`); 0 is background, value v is segment ``segments[v]``.
    sources
        The source instances (``medseg.io.dicom.source_datasets``); pixel data is not needed.
    segments
        ``{label value: {"name", "snomed", "category"}}`` as :func:`segment_descriptions` returns.
        Every entry becomes a segment (segment number = its rank, which equals the label value for
        models with labels 1..N), whether or not the prediction contains it.
    out_path
        The SEG file; written atomically.
    algorithm_name, algorithm_version
        Algorithm identification of every segment (e.g. ``"medseg ct_abdomen_phantom"``, ``"0.1.0"``).

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    DicomError
        Sources without usable geometry, or highdicom refusing them (the message names the series).
    ValueError
        A label map that does not fit the sources or holds undescribed values; segments without codes.
    """
    import highdicom as hd

    from medseg import __version__

    out_path = Path(out_path)
    planes = source_planes(sources)
    label_map = check_label_map(label_map, planes, segments)
    values = sorted(int(v) for v in segments)
    # segment numbers 1..N in label order (highdicom's label-map style needs them consecutive)
    lut = np.zeros(max(values) + 1, dtype=np.uint8 if len(values) < 256 else np.uint16)
    for number, value in enumerate(values, 1):
        lut[value] = number
    pixels = lut[label_map]
    if len(sources) == 1 and planes[0].frame_number is not None:
        # one multi-frame source: highdicom pairs pixel_array[i] with frame i + 1 of the file
        in_file_order = np.empty_like(pixels)
        in_file_order[[p.frame_number - 1 for p in planes]] = pixels  # type: ignore[operator]
        pixels = in_file_order
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name[:64], version=algorithm_version[:64],
                                                   family=Code("123110", "DCM", "Artificial Intelligence"))
    descriptions = []
    for number, value in enumerate(values, 1):
        entry = segments[value]
        snomed, category = complete_code(entry.get("snomed")), complete_code(entry.get("category"))
        if snomed is None or category is None:
            raise ValueError(f"segment {value} ({entry.get('name')!r}) needs a SNOMED CT type and category code")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(entry["name"])[:64],
            segmented_property_category=Code(category["code"], category["scheme"], category["meaning"]),
            segmented_property_type=Code(snomed["code"], snomed["scheme"], snomed["meaning"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*label_colour_255(value)),
        ))
    if not pixels.any():
        log.warning("series %s: the prediction is empty; the SEG describes %d segment(s) with empty frames only",
                    sources[0].SeriesInstanceUID, len(values))
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=algorithm_name[:64],
            software_versions=__version__,
            device_serial_number="0",
            content_label="MEDSEG",
            content_description=series_description[:64],
            series_description=series_description[:64],
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise DicomError(None, f"series {sources[0].get('SeriesInstanceUID', '?')}: cannot build a DICOM SEG "
                               f"on these source images ({exc})") from exc
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    log.info("DICOM SEG %s: series %s, %d frame(s), %d segment(s), source series %s",
             out_path.name, seg.SeriesInstanceUID, int(seg.NumberOfFrames), len(values), sources[0].SeriesInstanceUID)
    return out_path
