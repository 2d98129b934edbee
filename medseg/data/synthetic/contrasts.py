"""Further MR contrasts of a synthetic patient: the same anatomy with other tissue signals, for datasets
of several co-registered input channels (like BraTS's T1, T2 and FLAIR).

Signals are relative to fat (T1-like: :mod:`.anatomy`); each tissue's signal is jittered per case.
Lesions are T1-hypointense and T2/FLAIR/PD-hyperintense, as most focal liver lesions are.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medseg.data.synthetic.anatomy import _MR_LESION_CONTRAST, _MR_SIGNAL, Anatomy
from medseg.errors import InputError

__all__ = ["MR_CONTRASTS", "extra_contrasts", "with_contrast"]

_Table = dict[str, tuple[float, float]]
#: Nominal signal and per-case jitter of each tissue, and the lesion's contrast to liver, per MR contrast.
_TABLES: dict[str, tuple[_Table, tuple[float, float]]] = {
    "T1": (_MR_SIGNAL, _MR_LESION_CONTRAST),
    "T2": ({"air": (0.0, 0.0), "fat": (0.85, 0.03), "soft_tissue": (0.38, 0.03), "liver": (0.22, 0.03),
            "spleen": (0.62, 0.03), "kidney": (0.78, 0.03), "bone": (0.12, 0.03)}, (0.45, 0.04)),
    "FLAIR": ({"air": (0.0, 0.0), "fat": (0.70, 0.03), "soft_tissue": (0.30, 0.03), "liver": (0.42, 0.03),
               "spleen": (0.55, 0.03), "kidney": (0.20, 0.03), "bone": (0.10, 0.03)}, (0.30, 0.04)),
    "PD": ({"air": (0.0, 0.0), "fat": (1.0, 0.03), "soft_tissue": (0.55, 0.03), "liver": (0.42, 0.03),
            "spleen": (0.72, 0.03), "kidney": (0.85, 0.03), "bone": (0.30, 0.03)}, (0.22, 0.04)),
}
#: The MR contrasts a phantom can be rendered in.
MR_CONTRASTS: tuple[str, ...] = tuple(_TABLES)


def extra_contrasts(modality: str, count: int) -> tuple[str, ...]:
    """The contrasts of channels 1..``count`` of a ``modality`` phantom: MR contrasts other than the
    first channel's (a CT phantom: T1, T2, FLAIR; an MR phantom, T1-like itself: T2, FLAIR, PD).

    Raises
    ------
    InputError
        More extra channels than contrasts.
    """
    available = ("T1", "T2", "FLAIR") if modality == "ct" else ("T2", "FLAIR", "PD")
    if not 0 <= count <= len(available):
        raise InputError(None, f"a synthetic {modality.upper()} dataset has at most {len(available) + 1} channels "
                         f"({'CT' if modality == 'ct' else 'T1'}, {', '.join(available)}), asked for {count + 1}")
    return available[:count]


def with_contrast(anatomy: Anatomy, contrast: str, rng: np.random.Generator) -> Anatomy:
    """``anatomy`` as an MR patient of ``contrast`` (tissue signals sampled from ``rng``): render it for
    a further channel on the same grid.

    Raises
    ------
    InputError
        An unknown contrast.
    """
    if contrast not in _TABLES:
        raise InputError(None, f"unknown MR contrast {contrast!r}; expected one of {', '.join(MR_CONTRASTS)}")
    table, (lesion, jitter) = _TABLES[contrast]
    values = {name: float(nominal + rng.uniform(-spread, spread)) for name, (nominal, spread) in table.items()}
    values["lesion"] = float(values["liver"] + lesion + rng.uniform(-jitter, jitter))
    return dataclasses.replace(anatomy, modality="mr", intensities=values)
