"""PNG figures for reports: label-map overlays, Dice box plots, training curves.

Rendering uses matplotlib's object-oriented API on the Agg canvas
(:class:`matplotlib.figure.Figure` + :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`):
no display, no pyplot and no global backend switch, so importing this module never changes the
backend of a notebook or GUI that imports it, and no figure is ever left open.

Orientation of the overlays
---------------------------
Arrays are in medseg's voxel index order ``(x, y, z)`` (see :func:`medseg.io.image.to_array`),
in any orientation. :func:`overlay_png` takes the image's :class:`~medseg.io.image.Geometry`
(``geometry=``) and reorients the arrays to the closest RAS axes (``nibabel.orientations``) before
slicing, so that every image is shown the same way up whatever its direction matrix (an oblique
grid is shown along its closest RAS axes, not resampled):

* axial (transverse): anterior up, the patient's right on the image left (radiological convention);
* coronal: superior up, the patient's right on the image left;
* sagittal: superior up, anterior on the image left.

Each panel is marked with these letters (R/L/A/P/S/I) at its edges. Without ``geometry`` the
arrays are taken as an ITK image with an identity direction: index axes along L, P, S (LPS).
Pixels are drawn with their physical aspect ratio (``aspect`` = row spacing / column spacing), so
anisotropic voxels do not look squashed.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from nibabel import orientations
from scipy import ndimage

from medseg.io.atomic import atomic_path
from medseg.io.geometry import Geometry
from medseg.labels.colours import PALETTE, label_colour

__all__ = ["LABEL_ALPHA", "dice_boxplot_png", "label_colour", "overlay_png", "render_overlay", "training_curves_png"]

log = logging.getLogger(__name__)

#: Opacity of the filled label overlay.
LABEL_ALPHA = 0.45
_DPI = 100
_PANEL_IN = 2.4  # width of one overlay panel cell, inches
_HEADER_IN = 0.75  # title + legend band
_LETTER = {"color": "yellow", "fontsize": 7, "fontweight": "bold"}
_MAX_PERCENTILE_SAMPLES = 1 << 20
#: 128 grey levels (about 3 HU each in a 400 HU window, below the noise): 10 % smaller PNGs than 256
_GREY = colormaps["gray"].resampled(128)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _new_figure(width_in: float, height_in: float) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(figure)
    return figure


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # no "Software" text chunk: deterministic bytes and no URL inside the file
    figure.savefig(buffer, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


def _write(out: str | Path, data: bytes) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out


def _ras_affine(spacing: Sequence[float], geometry: Geometry | None) -> np.ndarray:
    """Index-to-RAS affine: the geometry's, or an identity-direction (LPS) grid's with ``spacing``."""
    if geometry is not None:
        if not np.allclose(geometry.spacing, spacing, rtol=1e-5, atol=1e-6):
            raise ValueError(f"spacing {tuple(spacing)} differs from the geometry's {geometry.spacing}")
        return geometry.affine_ras()
    d = len(spacing)
    affine = np.eye(d + 1)
    affine[:d, :d] = np.diag(spacing)
    flip = np.ones(d + 1)
    flip[: min(d, 2)] = -1.0  # LPS -> RAS
    return np.diag(flip) @ affine


def _to_ras(arrays: Sequence[np.ndarray], spacing: Sequence[float], affine: np.ndarray
            ) -> tuple[list[np.ndarray], tuple[float, ...], np.ndarray]:
    """Reorient arrays to the closest RAS axes; return them, their spacing along the new axes and
    the new index-to-RAS affine."""
    ornt = orientations.io_orientation(affine)
    new_spacing = [0.0] * len(spacing)
    for axis, (target, _flip) in enumerate(ornt):
        new_spacing[int(target)] = float(spacing[axis])
    new_affine = affine @ orientations.inv_ornt_aff(ornt, arrays[0].shape)
    return [orientations.apply_orientation(a, ornt) for a in arrays], tuple(new_spacing), new_affine


def _position(affine: np.ndarray, shape: Sequence[int], axis: int, index: int) -> str:
    """World position (RAS, mm) of the centre of slice ``index`` along ``axis``: e.g. ``"S 12.5 mm"``."""
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    centre[axis] = index
    world = affine[:3, :3] @ centre + affine[:3, 3]
    letters = ("RL", "AP", "SI")[axis]
    value = float(world[axis])
    return f"{letters[0] if value >= 0 else letters[1]} {abs(value):.1f} mm"


def _window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        low, high = float(window[0]), float(window[1])
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"window {window} must be (low, high) with low < high")
        return low, high
    flat = image.reshape(-1)
    if flat.size > _MAX_PERCENTILE_SAMPLES:
        flat = flat[:: flat.size // _MAX_PERCENTILE_SAMPLES + 1]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(flat, [1.0, 99.0]))
    return (low, high) if high > low else (low, low + 1.0)


# view name -> (fixed RAS axis, slicer, (row axis, column axis), edge letters left/right/top/bottom)
_VIEWS: dict[str, tuple[int, Any, tuple[int, int], tuple[str, str, str, str]]] = {
    # axial: rows A->P (anterior up), columns R->L (patient's right on the image left)
    "axial": (2, lambda v, k: v[::-1, ::-1, k].T, (1, 0), ("R", "L", "A", "P")),
    # coronal: rows S->I, columns R->L
    "coronal": (1, lambda v, j: v[::-1, j, ::-1].T, (2, 0), ("R", "L", "S", "I")),
    # sagittal: rows S->I, columns A->P
    "sagittal": (0, lambda v, i: v[i, ::-1, ::-1].T, (2, 1), ("A", "P", "S", "I")),
}


def _slice_through(mask: np.ndarray, axis: int) -> int:
    """Index along ``axis`` nearest the mask's centre of mass among the slices that contain the mask."""
    others = tuple(a for a in range(mask.ndim) if a != axis)
    occupied = np.flatnonzero(mask.any(axis=others))
    centre = ndimage.center_of_mass(mask)[axis]
    return int(occupied[np.argmin(np.abs(occupied - centre))])


def _overlay_rgba(labels2d: np.ndarray, lut: np.ndarray) -> np.ndarray:
    rgba: np.ndarray = lut[np.clip(labels2d, 0, lut.shape[0] - 1)]
    return rgba


def _colour_lut(values: Sequence[int]) -> np.ndarray:
    top = max([0, *values])
    lut = np.zeros((top + 1, 4))
    for value in values:
        if value > 0:
            lut[value, :3] = label_colour(value)
            lut[value, 3] = LABEL_ALPHA
    return lut


def _draw_panel(ax: Any, image2d: np.ndarray, labels2d: np.ndarray, lut: np.ndarray, aspect: float,
                vrange: tuple[float, float], highlight: int | None, letters: tuple[str, str, str, str],
                title: str) -> None:
    rows, cols = image2d.shape
    # nearest when enlarging (honest voxels, and small PNGs: smooth-interpolated noise compresses
    # badly), antialiased when shrinking a large slice
    interpolation = "nearest" if max(rows, cols) <= _PANEL_IN * _DPI else "antialiased"
    ax.imshow(image2d, cmap=_GREY, vmin=vrange[0], vmax=vrange[1], aspect=aspect, interpolation=interpolation)
    ax.imshow(_overlay_rgba(labels2d, lut), aspect=aspect, interpolation="nearest")
    for value in np.unique(labels2d):
        if value == 0 or value >= lut.shape[0] or lut[value, 3] == 0:
            continue
        mask = (labels2d == value).astype(np.uint8)
        if mask.all():
            continue
        ax.contour(mask, levels=[0.5], colors=[label_colour(int(value))],
                   linewidths=1.4 if value == highlight else 0.7)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    left, right, top, bottom = letters
    ax.text(0.02, 0.5, left, transform=ax.transAxes, ha="left", va="center", **_LETTER)
    ax.text(0.98, 0.5, right, transform=ax.transAxes, ha="right", va="center", **_LETTER)
    ax.text(0.5, 0.98, top, transform=ax.transAxes, ha="center", va="top", **_LETTER)
    ax.text(0.5, 0.02, bottom, transform=ax.transAxes, ha="center", va="bottom", **_LETTER)
    ax.set_title(title, fontsize=8)


def _check_inputs(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D image, got shape {image.shape}")
    if labels.shape != image.shape:
        raise ValueError(f"label map shape {labels.shape} differs from image shape {image.shape}")
    if len(spacing) != image.ndim or not all(float(s) > 0 for s in spacing):
        raise ValueError(f"spacing {tuple(spacing)} must hold {image.ndim} positive values")
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    elif labels.dtype.kind not in "iu":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError("label map does not hold integers")
        labels = labels.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise ValueError("label map holds negative values")
    return image, labels


# --------------------------------------------------------------------------------------------
# Overlay
# --------------------------------------------------------------------------------------------


def render_overlay(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], label_names: Mapping[int, str],
                    title: str, window: tuple[float, float] | None = None, geometry: Geometry | None = None
                    ) -> tuple[bytes, list[dict[str, Any]]]:
    """The overlay of :func:`overlay_png` as PNG bytes, and where each panel lies in it.

    Returns
    -------
    (bytes, list of dict)
        The PNG, and per panel ``{"label": value or None, "view": "axial" | "coronal" | "sagittal",
        "slice": index along the view's axis after reorientation to RAS, "bbox": (x0, y0, x1, y1)}``,
        ``bbox`` being the box of the displayed slice in PNG pixels from the top-left corner.

    Raises
    ------
    ValueError
        As :func:`overlay_png`.
    """
    image, labels = _check_inputs(image, labels, spacing)
    spacing = tuple(float(s) for s in spacing)
    (image, labels), spacing, affine = _to_ras([image, labels], spacing, _ras_affine(spacing, geometry))
    vrange = _window(image, window)
    present = [int(v) for v in np.unique(labels) if v != 0]
    lut = _colour_lut(present)

    def name(value: int) -> str:
        return str(label_names.get(value, f"label_{value}"))

    # rows: (label or None, {view: slice index})
    plan: list[tuple[int | None, dict[str, int]]] = []
    views = ["axial"] if image.ndim == 2 else list(_VIEWS)
    if image.ndim == 2:
        plan.append((None, {"axial": 0}))
    elif not present:
        plan.append((None, {v: image.shape[_VIEWS[v][0]] // 2 for v in views}))
    else:
        for label in present:
            mask = labels == label
            plan.append((label, {v: _slice_through(mask, _VIEWS[v][0]) for v in views}))

    n_rows, n_cols = len(plan), len(views)
    extent = np.asarray(image.shape, dtype=np.float64) * np.asarray(spacing)  # mm along R, A(, S)
    if image.ndim == 2:
        ratios = [extent[1] / extent[0]]
    else:
        ratios = [extent[_VIEWS[v][2][0]] / extent[_VIEWS[v][2][1]] for v in views]
    cell_w = _PANEL_IN if image.ndim == 3 else 1.5 * _PANEL_IN
    cell_h = cell_w * float(np.clip(max(ratios), 0.35, 1.4))  # rows only as tall as the tallest panel needs
    gap = 0.3  # inches for each panel's title
    width = max(n_cols * cell_w + 0.2, 4.0)
    legend_cols = 5 if image.ndim == 3 else 3
    header = _HEADER_IN + 0.17 * max(0, math.ceil(len(present) / legend_cols) - 1)  # more legend lines
    height = header + n_rows * (cell_h + gap) + 0.1
    figure = _new_figure(width, height)
    figure.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    if present:
        handles = [Patch(facecolor=(*label_colour(v), LABEL_ALPHA + 0.2), edgecolor=label_colour(v),
                         label=f"{v}: {name(v)}") for v in present]
        figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.32 / height),
                      ncol=min(len(handles), legend_cols), fontsize=7, frameon=False,
                      handlelength=1.2, columnspacing=1.0)
    else:
        figure.text(0.5, 1 - 0.4 / height, "no structures", ha="center", va="top", fontsize=9,
                    color="darkred", fontstyle="italic")
    grid = figure.add_gridspec(n_rows, n_cols, left=0.1 / width, right=1 - 0.1 / width, bottom=0.1 / height,
                               top=1 - (header + gap - 0.05) / height, hspace=gap / cell_h, wspace=0.04)

    axes: list[tuple[Any, int | None, str, int]] = []
    for row, (value, slices) in enumerate(plan):
        for col, view in enumerate(views):
            ax = figure.add_subplot(grid[row, col])
            if image.ndim == 2:
                image2d, labels2d = image[::-1, ::-1].T, labels[::-1, ::-1].T  # axial: A up, R on the left
                aspect = spacing[1] / spacing[0]
                letters = _VIEWS["axial"][3]
                panel_title = "axial (2D)" + ("" if present else ": no structures")
                index = slices[view]
            else:
                fixed, slicer, (row_axis, col_axis), letters = _VIEWS[view]
                index = slices[view]
                image2d, labels2d = slicer(image, index), slicer(labels, index)
                aspect = spacing[row_axis] / spacing[col_axis]
                where = f"{view} {_position(affine, image.shape, fixed, index)}"
                panel_title = f"{name(value)}: {where}" if value is not None else f"{where} (middle)"
            _draw_panel(ax, image2d.astype(np.float32), labels2d, lut, aspect, vrange, value, letters, panel_title)
            axes.append((ax, value, view, index))

    figure.canvas.draw()
    height_px = figure.bbox.height
    panels = []
    for ax, value, view, index in axes:
        box = ax.get_window_extent()
        panels.append({"label": value, "view": view, "slice": index,
                       "bbox": (box.x0, height_px - box.y1, box.x1, height_px - box.y0)})
    return _png_bytes(figure), panels


def overlay_png(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], label_names: Mapping[int, str],
                out: str | Path, title: str, window: tuple[float, float] | None = None, *,
                geometry: Geometry | None = None) -> Path:
    """Write a PNG of ``labels`` over ``image``: per structure, slices through its centre of mass.

    3D: one row per label present, three panels (axial, coronal, sagittal) through the label's
    centre of mass (the nearest slice that contains the label, for labels such as two kidneys whose
    centre falls between them). 2D: one axial panel with every label. No label: one row of middle
    slices marked "no structures". The image is grey, windowed to ``window`` (e.g. ``(-160, 240)``
    HU for abdominal CT) or else to its 1st-99th percentile; every label is filled with its fixed
    colour (:func:`label_colour`, opacity :data:`LABEL_ALPHA`), and outlined (thicker for the
    row's structure); a legend names the labels. See the module docstring for the orientation.

    Parameters
    ----------
    image, labels
        Arrays of one shape in index order ``(x, y, z)``; ``labels`` holds non-negative integers.
    spacing
        Voxel spacing (mm) per index axis.
    label_names
        ``{value: name}``; labels not in it are named ``label_<n>``.
    out
        PNG file, written atomically.
    geometry
        Grid of the arrays (its direction decides the orientation, its spacing must equal
        ``spacing``); default: an identity-direction (LPS) grid with ``spacing``.

    Raises
    ------
    ValueError
        Shapes differ, a dimension other than 2 or 3, bad spacing or window, a label map that does
        not hold non-negative integers.
    """
    data, _panels = render_overlay(image, labels, spacing, label_names, title, window, geometry)
    return _write(out, data)


# --------------------------------------------------------------------------------------------
# Dice box plot and training curves
# --------------------------------------------------------------------------------------------


def dice_boxplot_png(dice_by_label: Mapping[str, Sequence[float]], out: str | Path, title: str = "Dice per label") -> Path:
    """Write a box plot of the Dice scores of each label (one box per label, the cases as dots).

    NaN scores (label absent from prediction and reference) are left out; a label without any
    score is marked "n/a". Written atomically.
    """
    names = [str(n) for n in dice_by_label]
    values = [np.asarray([v for v in dice_by_label[n] if v is not None], dtype=np.float64) for n in dice_by_label]
    values = [v[np.isfinite(v)] for v in values]
    figure = _new_figure(max(4.0, 1.5 + 0.9 * len(names)), 3.6)
    ax = figure.add_subplot()
    with_data = [i for i, v in enumerate(values) if v.size]
    if with_data:
        ax.boxplot([values[i] for i in with_data], positions=[i + 1 for i in with_data], widths=0.5,
                   showfliers=False, medianprops={"color": "black"})
        rng = np.random.default_rng(0)
        for i in with_data:
            jitter = rng.uniform(-0.12, 0.12, values[i].size)
            ax.scatter(i + 1 + jitter, values[i], s=12, color=PALETTE[i % len(PALETTE)], alpha=0.8, zorder=3)
    for i, v in enumerate(values):
        if not v.size:
            ax.text(i + 1, 0.5, "n/a", ha="center", va="center", fontsize=8, color="grey")
    if not names:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30 if len(names) > 5 else 0, fontsize=8)
    ax.set_xlim(0.4, len(names) + 0.6)
    top = max([1.0, *(float(v.max()) for v in values if v.size)])
    bottom = min([0.0, *(float(v.min()) for v in values if v.size)])
    ax.set_ylim(bottom - 0.02, top + 0.02)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return _write(out, _png_bytes(figure))


def training_curves_png(epochs: Sequence[int], losses: Sequence[float], val_epochs: Sequence[int],
                        val_dice: Sequence[float], out: str | Path) -> Path:
    """Write the training loss per epoch (left panel) and the validation mean Dice (right panel).

    Raises
    ------
    ValueError
        ``epochs`` and ``losses`` (or ``val_epochs`` and ``val_dice``) differ in length.
    """
    if len(epochs) != len(losses):
        raise ValueError(f"{len(epochs)} epochs but {len(losses)} losses")
    if len(val_epochs) != len(val_dice):
        raise ValueError(f"{len(val_epochs)} validation epochs but {len(val_dice)} Dice values")
    figure = _new_figure(8.0, 3.2)
    loss_ax, dice_ax = figure.subplots(1, 2)
    if len(epochs):
        loss_ax.plot(list(epochs), [float(v) for v in losses], marker="o", markersize=3, color=PALETTE[0])
    else:
        loss_ax.text(0.5, 0.5, "no epochs", ha="center", va="center", transform=loss_ax.transAxes, color="grey")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("Loss", fontsize=10)
    loss_ax.grid(alpha=0.3)
    dice = np.asarray([float(v) for v in val_dice], dtype=np.float64)
    if dice.size:
        dice_ax.plot(list(val_epochs), dice, marker="o", markersize=3, color=PALETTE[2])
        finite = np.flatnonzero(np.isfinite(dice))
        if finite.size:
            best = int(finite[np.argmax(dice[finite])])
            dice_ax.scatter([list(val_epochs)[best]], [dice[best]], s=40, facecolors="none", edgecolors="black",
                            zorder=3, label=f"best {dice[best]:.3f} (epoch {list(val_epochs)[best]})")
            dice_ax.legend(fontsize=7, loc="lower right")
    else:
        dice_ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=dice_ax.transAxes,
                     color="grey")
    dice_ax.set_ylim(0.0, 1.0)
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylabel("validation mean Dice")
    dice_ax.set_title("Validation", fontsize=10)
    dice_ax.grid(alpha=0.3)
    figure.tight_layout()
    return _write(out, _png_bytes(figure))
