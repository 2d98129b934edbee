"""SNOMED CT codes for segment labels (used in bundle metadata and, later, DICOM SEG).

Codes were checked against pydicom 3.0's ``pydicom.sr.codedict`` (SCT scheme; categories from
DICOM CID 7150 "Segmentation Property Categories").
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "BODY_SUBSTANCE",
    "LESION_WORDS",
    "MORPHOLOGICALLY_ABNORMAL",
    "TISSUE",
    "is_lesion_name",
    "segment_code",
]

#: Category codes (CID 7150).
ANATOMICAL_STRUCTURE = {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
MORPHOLOGICALLY_ABNORMAL = {"code": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"}
TISSUE = {"code": "85756007", "scheme": "SCT", "meaning": "Tissue"}
BODY_SUBSTANCE = {"code": "91720002", "scheme": "SCT", "meaning": "Body Substance"}

#: Lower-case label name -> (SNOMED CT code, meaning, category).
_KNOWN: dict[str, tuple[str, str, dict[str, str]]] = {
    "liver": ("10200004", "Liver", ANATOMICAL_STRUCTURE),
    "spleen": ("78961009", "Spleen", ANATOMICAL_STRUCTURE),
    "kidney": ("64033007", "Kidney", ANATOMICAL_STRUCTURE),
    "kidneys": ("64033007", "Kidney", ANATOMICAL_STRUCTURE),
    "pancreas": ("15776009", "Pancreas", ANATOMICAL_STRUCTURE),
    "brain": ("12738006", "Brain", ANATOMICAL_STRUCTURE),
    "bone": ("272673000", "Bone", ANATOMICAL_STRUCTURE),
    "vertebra": ("51282000", "Vertebra", ANATOMICAL_STRUCTURE),
    "organ": ("91772007", "Organ", ANATOMICAL_STRUCTURE),
    "white matter": ("389080008", "White Matter", TISSUE),
    "grey matter": ("389081007", "Gray Matter", TISSUE),
    "gray matter": ("389081007", "Gray Matter", TISSUE),
    "csf": ("65216001", "Cerebrospinal Fluid", BODY_SUBSTANCE),
    "cerebrospinal fluid": ("65216001", "Cerebrospinal Fluid", BODY_SUBSTANCE),
    "lesion": ("52988006", "Lesion", MORPHOLOGICALLY_ABNORMAL),
    "tumor": ("108369006", "Neoplasm", MORPHOLOGICALLY_ABNORMAL),
    "tumour": ("108369006", "Neoplasm", MORPHOLOGICALLY_ABNORMAL),
    "neoplasm": ("108369006", "Neoplasm", MORPHOLOGICALLY_ABNORMAL),
    "mass": ("4147007", "Mass", MORPHOLOGICALLY_ABNORMAL),
}


def segment_code(name: str) -> dict[str, Any]:
    """Segment description for a label name: SNOMED CT property type and category.

    Unknown names get ``"code": None`` (the bundle author should fill it in; DICOM SEG export
    needs one).
    """
    key = name.strip().lower().replace("_", " ")
    if key in _KNOWN:
        code, meaning, category = _KNOWN[key]
        return {"name": name, "snomed": {"code": code, "scheme": "SCT", "meaning": meaning}, "category": dict(category)}
    return {"name": name, "snomed": None, "category": dict(ANATOMICAL_STRUCTURE)}


#: Words that make a label a lesion (evaluated lesion by lesion, written as instances).
LESION_WORDS = ("lesion", "tumor", "tumour", "neoplasm", "mass", "metastasis", "metastases", "nodule", "cancer")


def is_lesion_name(name: str) -> bool:
    """True for label names such as ``lesion``, ``liver_tumor``, ``Metastasis``."""
    lowered = name.lower().replace("_", " ")
    return any(word in lowered for word in LESION_WORDS)
