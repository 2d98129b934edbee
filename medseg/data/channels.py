"""Input channels of a dataset: ``channel_names`` (nnU-Net v2) or ``modality`` (MSD), and the intensity
preset each channel gets.

A channel named as CT (:data:`CT_NAMES`, or nnU-Net's normalisation name ``"CT"``) gets the ``ct`` preset
(clip to foreground percentiles, z-score with the dataset's foreground mean and std); every other
channel the ``mr`` preset (z-score of each image on its non-zero voxels), which is nnU-Net's ``zscore``.
nnU-Net's ``noNorm``, ``rescale_to_0_1`` and ``rgb_to_0_1`` are not implemented: such channels are
z-scored too, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from medseg.errors import InputError

__all__ = ["CT_NAMES", "MR_NAMES", "channel_modality", "channel_preset", "parse_channel_names"]

log = logging.getLogger("medseg.data.datalist")

CT_NAMES = {"ct", "cta", "pet-ct"}
MR_NAMES = {"mr", "mri", "t1", "t1w", "t1c", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "pd", "t1ce"}
#: nnU-Net v2 normalisation names (lower case) that medseg reads as a z-score (the ``mr`` preset).
ZSCORE_NAMES = {"zscore"}
#: nnU-Net v2 normalisation names medseg does not implement (z-scored instead, with a warning).
UNSUPPORTED_NORMALISATIONS = {"nonorm", "rescale_to_0_1", "rgb_to_0_1"}


def channel_modality(name: str) -> str:
    """``"CT"`` or ``"MR"`` for a known channel name, else the name itself."""
    lowered = name.lower()
    if lowered in CT_NAMES:
        return "CT"
    if lowered in MR_NAMES or "mr" in lowered or lowered.startswith(("t1", "t2")):
        return "MR"
    return name


def channel_preset(name: str) -> str:
    """The intensity preset of a channel: ``"ct"`` for CT names, ``"mr"`` (z-score) for the others."""
    return "ct" if channel_modality(name) == "CT" else "mr"


def _warn_unknown(name: str, number: int, source: str | os.PathLike[str]) -> None:
    lowered = name.lower()
    if lowered in UNSUPPORTED_NORMALISATIONS:
        log.warning("%s: channel %d normalisation %r is not supported; medseg z-scores it (nnU-Net's 'zscore')",
                    source, number, name)
    elif lowered not in ZSCORE_NAMES and channel_modality(name) not in ("CT", "MR"):
        log.warning("%s: unknown modality %r of channel %d, using MR-style (z-score) normalisation",
                    source, name, number)


def parse_channel_names(data: dict[str, Any], source: str | os.PathLike[str]) -> tuple[str, ...]:
    """The channel names in channel order from ``channel_names`` (or ``modality``): ``{"0": "T1", "1": "T2"}``.

    Raises
    ------
    InputError
        (naming ``source``) Neither key given, not a mapping of channel numbers 0, 1, ... (all of them)
        to non-empty names.
    """
    raw = data.get("channel_names") or data.get("modality")
    if raw is None:
        raise InputError(source, "neither 'modality' nor 'channel_names' is given")
    if isinstance(raw, str):
        raw = {"0": raw}
    if not isinstance(raw, dict) or not raw:
        raise InputError(source, "'modality' must map channel numbers to names, e.g. {\"0\": \"CT\"}")
    numbered: dict[int, str] = {}
    for key, name in raw.items():
        if not str(key).strip().isdigit() or not isinstance(name, str) or not name.strip():
            raise InputError(source, f"channel {key!r}: {name!r}; 'channel_names' must map channel numbers "
                             "to names, e.g. {\"0\": \"T1\", \"1\": \"T2\"}")
        numbered[int(key)] = name.strip()
    if sorted(numbered) != list(range(len(numbered))):
        raise InputError(source, f"channel numbers {sorted(numbered)} must be 0, 1, ... {len(numbered) - 1}")
    names = tuple(numbered[k] for k in range(len(numbered)))
    for number, name in enumerate(names):
        _warn_unknown(name, number, source)
    return names
