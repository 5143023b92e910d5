"""fMoW bounding boxes -> crop windows (``--crop-boxes``), and the windows every sample comes from.

An fMoW sidecar (``x_rgb.json`` beside ``x_rgb.jpg``) lists ``bounding_boxes``: entries with
``"box": [x, y, w, h]`` in image pixels, a ``"category"`` and an ``"ID"``. With ``--crop-boxes`` each
box becomes one sample: the box grown by a context margin, clipped to the image, optionally
resized (``--resize 224``). We follow the fMoW baseline's preparation
(fMoW/baseline ``code/data_ml_functions/dataFunctions.py``, ``_process_file``):

- boxes of width or height <= 2 pixels are skipped ("don't train on tiny boxes");
- the margin on each side is ``int(size * m / 2)``, ``m`` chosen per axis from the box/image size
  ratio ``r``: 0.15 for r >= 0.5, 0.2 below 0.5, 0.3 below 0.4, 0.5 below 0.3, 1 below 0.2, 2 below 0.1
  (``--box-context fmow``, the default), or a fixed ``m`` (``--box-context 0.15``);
- the grown box is clipped to the image; an empty result is skipped.

One deliberate difference: the baseline divides the box width by ``img.shape[0]`` (the image
*height*) and the box height by the width; we divide each by its own axis. The two agree on square
images. SatMAE (sustainlab-group/SatMAE ``util/datasets.py``) reads already prepared images from a
CSV and crops nothing itself, so the baseline is the reference for the crop.
"""

from __future__ import annotations

from shards.chips import Window, plan_windows
from shards.inputs import chip_key

# (lower bound of the box/image ratio, context multiplier): fMoW baseline schedule
FMOW_CONTEXT = ((0.5, 0.15), (0.4, 0.2), (0.3, 0.3), (0.2, 0.5), (0.1, 1.0), (0.0, 2.0))
MIN_BOX = 3  # pixels; the baseline skips boxes with a side <= 2


def fmow_context(ratio: float) -> float:
    """The baseline's context multiplier for a box covering ``ratio`` of the image along one axis."""
    for lower, mult in FMOW_CONTEXT:
        if ratio >= lower:
            return mult
    return FMOW_CONTEXT[-1][1]


def sidecar_boxes(extra: dict) -> list:
    """The sidecar's ``bounding_boxes`` as a list (the baseline also accepts a single object)."""
    boxes = extra.get("bounding_boxes")
    if boxes is None:
        return []
    return boxes if isinstance(boxes, list) else [boxes]


def box_window(box, width: int, height: int, context: float | None) -> Window | None:
    """``[x, y, w, h]`` -> the clipped crop window ``(col, row, w, h)``, or None (tiny or empty)."""
    try:
        x, y, w, h = (int(v) for v in box)
    except (TypeError, ValueError):
        return None
    if w < MIN_BOX or h < MIN_BOX:
        return None
    mw = context if context is not None else fmow_context(w / width)
    mh = context if context is not None else fmow_context(h / height)
    dx, dy = int(w * mw / 2.0), int(h * mh / 2.0)
    c1, r1 = max(0, x - dx), max(0, y - dy)
    c2, r2 = min(width, x + w + dx), min(height, y + h + dy)
    if c1 >= c2 or r1 >= r2:
        return None
    return c1, r1, c2 - c1, r2 - r1


def box_windows(extra: dict, width: int, height: int, context: float | None) -> list[tuple[int, Window]]:
    """(index in ``bounding_boxes``, window) for every usable box, in sidecar order."""
    out = []
    for i, entry in enumerate(sidecar_boxes(extra)):
        win = box_window(entry.get("box") if isinstance(entry, dict) else None, width, height, context)
        if win is not None:
            out.append((i, win))
    return out


def sample_windows(info, opts) -> list[Window]:
    """The windows of one source, in sample order: its boxes (--crop-boxes) or its chips."""
    if opts.crop_boxes:
        return [w for _, w in box_windows(info.extra, info.width, info.height, opts.box_context)]
    return plan_windows(info.width, info.height, opts.chip, opts.stride, opts.edge)


def no_window_reason(info, opts) -> str:
    """Why ``sample_windows`` gave nothing (for skipped.jsonl)."""
    if opts.crop_boxes:
        n = len(sidecar_boxes(info.extra))
        return (
            f"no usable bounding box for --crop-boxes ({n} in the sidecar; boxes need sides >= {MIN_BOX} px "
            "inside the image)"
            if n
            else "no 'bounding_boxes' in a JSON sidecar, nothing to crop"
        )
    return (
        f"image {info.width}x{info.height} is smaller than --chip-size {opts.chip[1]}x{opts.chip[0]} "
        "with --edge drop (use --edge pad)"
    )


def sample_key_meta(info, n: int, win: Window, opts, meta: dict) -> tuple[str, dict]:
    """Key and json of the ``n``-th sample of ``info``: chips are named by offset, box crops by their
    index in the sidecar (``<key>_box<i>``, the json keeps that one entry as ``"box"``)."""
    if not opts.crop_boxes:
        return chip_key(info.key, win, opts.chip is None), meta
    i = box_windows(info.extra, info.width, info.height, opts.box_context)[n][0]
    meta = dict(meta)
    meta.pop("bounding_boxes", None)
    meta["box"] = sidecar_boxes(info.extra)[i]
    return f"{info.key}_box{i}", meta
