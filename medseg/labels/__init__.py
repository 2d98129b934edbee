"""Labels: names (what each label-map value means), SNOMED CT codes and display colours.

The bottom layer of medseg with :mod:`medseg.errors`: every other layer takes label names, codes
and colours from here, never from a list of its own.
"""

from medseg.labels.codes import is_lesion_name, segment_code
from medseg.labels.colours import label_colour, label_colour_255
from medseg.labels.names import (
           MAX_LABEL,
           parse_label_mapping,
           parse_labels,
)
from medseg.labels.regions import IGNORE_NAME, DatasetLabels, Region, parse_dataset_labels
from medseg.labels.sources import read_label_names

__all__ = [
           "IGNORE_NAME",
           "MAX_LABEL",
           "DatasetLabels",
           "Region",
           "is_lesion_name",
           "label_colour",
           "label_colour_255",
           "parse_dataset_labels",
           "parse_label_mapping",
           "parse_labels",
           "read_label_names",
           "segment_code",
]
