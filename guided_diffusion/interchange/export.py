"""`main.py export`: labelled images out, in the formats other trainers read.

A source is a sample run folder (`samples/` = synthetic images, `labels/` = class-id masks, `config.json`), a
dataset folder (`train/` and `test/`, each with `images/` + `masks/`) or one split folder (`images/` + `masks/`).
The export goes to a fresh folder (``<root_log_dir>/export_NNN`` or an empty ``output_dir``)::

    coco/images/<split>/<file>                 the images, copied
    coco/annotations/instances_<split>.json    COCO instances: polygon or RLE, area, bbox, category ids and names
    yolo-seg/{images,labels}/<split>/ data.yaml YOLO segmentation: `class x1 y1 x2 y2 ...` (0..1)
    yolo-det/{images,labels}/<split>/ data.yaml YOLO detection: `class cx cy w h` (0..1)
    semantic/<split>/{images,masks,colored_masks}/, classes.json, palette.json   this project's layout
    classes.json, config.json, summary.json, contact_sheet.png, contact_sheet.html

An instance is a connected component of one class (8-connected by default), so a crack that touches a spot of
another class stays two objects. Components smaller than `min_area` pixels are left out of COCO and YOLO (the
semantic masks keep every pixel). A COCO polygon cannot have a hole, and pycocotools rasterises polygons in its
own way, so with `segmentation: "auto"` a component goes out as a polygon only when pycocotools turns that
polygon back into exactly the component's pixels; otherwise (holes, or a shape the rasteriser misses) it goes
out as RLE, which is exact. YOLO has no RLE: its polygon is the outer boundary, holes filled.
"""

from __future__ import annotations

import html
import io
import json
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import measure
from tqdm import tqdm

from ..config import ExportConfig, config_to_dict
from ..data import CLASSES_FILE, IMAGE_EXTENSIONS, MASK_EXTENSION, SPLITS, load_image, load_mask, read_class_names
from ..errors import ConfigError, DatasetError
from ..run_folder import new_run_dir, palette, write_json

SAMPLE_RUN_FOLDERS = ("samples", "labels")
CONTACT_CELL = 192  # side of one contact-sheet cell in pixels
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One labelled image to export: the image file and its class-id mask file, in a split."""

    split: str
    stem: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class Source:
    """What an export reads: the items, how to read their masks, and the classes."""

    kind: str  # "sample run", "dataset" or "split"
    items: list[Item]
    mask_mode: str  # dataset_mode used to read the masks ("multi-class" reads raw class ids)
    num_classes: int
    class_names: list[str]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _pair_folder(split: str, images_dir: Path, masks_dir: Path) -> list[Item]:
    """Pair `images_dir/<stem>.<ext>` with `masks_dir/<stem>.png`; every file must have its partner."""
    missing = [str(folder) for folder in (images_dir, masks_dir) if not folder.is_dir()]
    if missing:
        raise DatasetError(f"{' and '.join(missing)}: folder not found; a split holds images/ and masks/")
    images: dict[str, list[Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            images.setdefault(path.stem, []).append(path)
    masks = {p.stem: p for p in sorted(masks_dir.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == MASK_EXTENSION}
    clashes = [" and ".join(p.name for p in paths) for paths in images.values() if len(paths) > 1]
    if clashes:
        raise DatasetError(f"{images_dir}: several images share a name ({_listing(clashes)}); keep one per name")
    lonely_masks = sorted(set(masks) - set(images))
    lonely_images = sorted(set(images) - set(masks))
    if lonely_masks or lonely_images:
        parts = []
        if lonely_masks:
            parts.append(f"{len(lonely_masks)} masks in {masks_dir} without an image ({_listing(lonely_masks)})")
        if lonely_images:
            parts.append(f"{len(lonely_images)} images in {images_dir} without a mask ({_listing(lonely_images)})")
        raise DatasetError("; ".join(parts))
    if not masks:
        raise DatasetError(f"{masks_dir}: no .png masks to export")
    return [Item(split, stem, images[stem][0], masks[stem]) for stem in sorted(masks)]


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    """The sample run's config.json (num_classes, data_dir), or {} when the run has none."""
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error}); the sample run's config cannot be read") from None
    return values if isinstance(values, dict) else {}


def _max_class_id(items: Iterable[Item], mask_mode: str) -> int:
    """The largest class id over all masks, for a source that does not say how many classes it has."""
    return max(int(load_mask(item.mask, mask_mode).max()) for item in items)


def find_source(config: ExportConfig) -> Source:
    """Recognise the source folder's kind, pair its files and settle the classes (count and names).

    The class count comes from `num_classes`, else the sample run's config.json, else classes.json, else the
    largest id in the masks; the names from `classes_file`, else the dataset's classes.json, else `class_<i>`.
    """
    root = Path(config.source)
    if not root.is_dir():
        raise ConfigError(f"key 'source': folder {root} not found (give a sample run, a dataset or a split folder)")
    run_config: dict[str, Any] = {}
    names_dirs: list[Path] = []
    if all((root / folder).is_dir() for folder in SAMPLE_RUN_FOLDERS):
        kind, mask_mode = "sample run", "multi-class"  # labels/ always holds class ids, even for binary data
        items = _pair_folder("train", root / "samples", root / "labels")
        run_config = _read_run_config(root)
        if run_config.get("data_dir"):
            names_dirs.append(Path(run_config["data_dir"]))
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        kind, mask_mode = "split", config.dataset_mode
        split = root.name if root.name in SPLITS + ("val",) else "train"
        items = _pair_folder(split, root / "images", root / "masks")
        names_dirs += [root, root.parent]
    elif (root / "train").is_dir():
        kind, mask_mode = "dataset", config.dataset_mode
        items = [item for split in SPLITS if (root / split).is_dir()
                 for item in _pair_folder(split, root / split / "images", root / split / "masks")]
        names_dirs.append(root)
    else:
        raise ConfigError(f"key 'source': {root} is neither a sample run (samples/ + labels/), a dataset (train/, "
                          "test/) nor a split folder (images/ + masks/)")
    if config.max_images:
        items = items[: config.max_images]

    if config.classes_file:
        names_file = Path(config.classes_file)
        if not names_file.is_file():
            raise ConfigError(f"key 'classes_file': {names_file} not found")
    else:
        names_file = next((d / CLASSES_FILE for d in names_dirs if (d / CLASSES_FILE).is_file()), None)
    num_classes = config.num_classes or run_config.get("num_classes")
    if num_classes is None and names_file is not None:
        num_classes = len(read_class_names(names_file))
    if num_classes is None:
        num_classes = max(2, _max_class_id(items, mask_mode) + 1)
    if num_classes > 256:
        raise DatasetError(f"{root}: {num_classes} classes; an export writes uint8 masks, so at most 256")
    if names_file is not None:
        names = read_class_names(names_file, num_classes)
    else:
        names = [f"class_{i}" for i in range(num_classes)]
    return Source(kind, items, mask_mode, int(num_classes), names)


def read_item_mask(item: Item, source: Source) -> np.ndarray:
    """The item's mask as int64 class ids, checked against the class count and the image size."""
    mask = load_mask(item.mask, source.mask_mode)
    high = int(mask.max()) if mask.size else 0
    if high >= source.num_classes:
        bad = sorted(set(np.unique(mask).tolist()) - set(range(source.num_classes)))
        raise DatasetError(f"{item.mask}: class ids {bad[:8]} outside 0..{source.num_classes - 1} "
                           f"(num_classes {source.num_classes}); set num_classes or fix the mask")
    try:
        with Image.open(item.image) as image:
            width, height = image.size
    except Exception as error:  # any decoder failure on a user file is a data problem
        raise DatasetError(f"{item.image}: cannot be read ({str(error)[:80]})") from None
    if (height, width) != mask.shape:
        raise DatasetError(f"{item.image}: image is {width}x{height} but its mask {item.mask.name} is "
                           f"{mask.shape[1]}x{mask.shape[0]}")
    return mask


# --------------------------------------------------------------------------------------------------------------
# Instances, polygons, RLE
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One connected component of one class.

    `crop` is the component's boolean mask inside its bounding box (x, y, w, h in pixels); `polygon` is the outer
    boundary as (K, 2) x, y vertices in COCO's pixel-edge coordinates (pixel (0, 0) covers [0, 1) x [0, 1)).
    """

    class_id: int
    bbox: tuple[int, int, int, int]
    crop: np.ndarray = field(repr=False)
    polygon: np.ndarray = field(repr=False)
    has_holes: bool

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """The component as a boolean mask of the whole image."""
        x, y, w, h = self.bbox
        full = np.zeros((height, width), dtype=bool)
        full[y : y + h, x : x + w] = self.crop
        return full


@dataclass(frozen=True)
class Instances:
    """The instances kept from one mask and what `min_area` dropped."""

    kept: list[Instance]
    dropped: int
    dropped_pixels: int


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove repeated and exactly collinear vertices of a closed polygon (the shape is unchanged).

    Marching-squares vertices sit on a half-pixel grid, so the cross products are exact in floating point.
    """
    points = points[np.any(points != np.roll(points, 1, axis=0), axis=1)]
    if len(points) < 4:
        return points
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    a, b = points - before, after - points
    keep = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] != 0
    return points[keep]


def fill_holes(crop: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """The component with its holes filled. A hole is background that cannot reach the border; the background's
    connectivity is the dual of the component's (8-connected objects leave 4-connected background)."""
    return ndimage.binary_fill_holes(crop, structure=np.ones((3, 3), bool) if connectivity == 4 else None)


def outer_polygon(crop: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """The outer boundary of one component (boolean crop) as (K, 2) x, y vertices relative to the crop.

    Marching squares at level 0.5 on the hole-filled component: each boundary vertex lies half-way between an
    inside and an outside pixel centre, so sampling the polygon at pixel centres gives the component back.
    `connectivity` 8 joins diagonal neighbours (`fully_connected="high"`), 4 keeps them apart.
    """
    filled = fill_holes(crop, connectivity)
    level = "high" if connectivity == 8 else "low"
    contours = measure.find_contours(np.pad(filled, 1).astype(np.float32), 0.5, fully_connected=level)
    contour = max(contours, key=len)  # one contour for a filled component; the longest if ever more
    # (row, col) in the padded crop -> x, y in pixel-edge coordinates of the crop
    points = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)
    return _drop_collinear(points[:-1] if np.array_equal(points[0], points[-1]) else points)


def find_instances(mask: np.ndarray, num_classes: int, min_area: int, connectivity: int = 8) -> Instances:
    """Split a class-id mask into connected components per class (background 0 excluded).

    Components with fewer than `min_area` pixels are dropped (counted in `dropped`). Instances come in class
    order, then in OpenCV's component order (top to bottom by first pixel), so an export is reproducible.
    """
    kept: list[Instance] = []
    dropped = dropped_pixels = 0
    for class_id in range(1, num_classes):
        binary = (mask == class_id).astype(np.uint8)
        if not binary.any():
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity)
        for k in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[k])
            if area < min_area:
                dropped += 1
                dropped_pixels += area
                continue
            crop = labels[y : y + h, x : x + w] == k
            has_holes = bool(fill_holes(crop, connectivity).sum() != area)
            polygon = outer_polygon(crop, connectivity) + np.array([x, y], dtype=np.float64)
            kept.append(Instance(class_id, (x, y, w, h), crop, polygon, has_holes))
    return Instances(kept, dropped, dropped_pixels)


def polygon_to_mask(flat_xy: list[float], height: int, width: int) -> np.ndarray:
    """Rasterise one COCO polygon the way pycocotools (and so every COCO trainer) does."""
    rles = mask_utils.frPyObjects([flat_xy], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a boolean HxW mask, with `counts` as a JSON string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _flat(polygon: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in polygon.ravel()]


def coco_segmentation(instance: Instance, height: int, width: int, mode: str) -> tuple[Any, str]:
    """The COCO `segmentation` of an instance and its kind ("polygon" or "rle").

    "auto": a polygon when pycocotools rasterises it back to exactly the component (and the component has no
    hole), else RLE. "polygon": always the outer polygon (holes filled). "rle": always RLE.
    """
    if mode == "rle":
        return encode_rle(instance.full_mask(height, width)), "rle"
    flat = _flat(instance.polygon)
    if mode == "polygon":
        return [flat], "polygon"
    if not instance.has_holes and len(flat) >= 6:
        drawn = polygon_to_mask(flat, height, width)
        x, y, w, h = instance.bbox
        if drawn.sum() == instance.area and np.array_equal(drawn[y : y + h, x : x + w], instance.crop):
            return [flat], "polygon"
    return encode_rle(instance.full_mask(height, width)), "rle"


def yolo_segment_line(instance: Instance, width: int, height: int) -> str:
    """`<class> x1 y1 x2 y2 ...`: YOLO class index (class id - 1, as background has none) and the outer polygon
    normalised by the image size."""
    coords = instance.polygon / np.array([width, height], dtype=np.float64)
    return " ".join([str(instance.class_id - 1)] + [f"{v:.6f}" for v in np.clip(coords, 0.0, 1.0).ravel()])


def yolo_box_line(instance: Instance, width: int, height: int) -> str:
    """`<class> cx cy w h`: YOLO class index and the component's pixel box, normalised by the image size."""
    x, y, w, h = instance.bbox
    values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
    return " ".join([str(instance.class_id - 1)] + [f"{v:.6f}" for v in values])


# --------------------------------------------------------------------------------------------------------------
# Writers (one per format)
# --------------------------------------------------------------------------------------------------------------


def _copy_new(source: Path, target: Path) -> None:
    """Copy a file to a path that must not exist yet (an export never overwrites)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "xb") as writer:
        shutil.copyfileobj(reader, writer)


def _write_new(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as handle:
        handle.write(data)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_name(item: Item) -> str:
    return item.stem + item.image.suffix.lower()


class CocoWriter:
    """COCO instances per split: `coco/images/<split>/` and `coco/annotations/instances_<split>.json`.

    Category ids are the class ids (1..num_classes-1; background has none) and names come from classes.json,
    so an import of this file gives the same class ids back.
    """

    def __init__(self, folder: Path, class_names: list[str], segmentation: str, source: str) -> None:
        self.folder = folder
        self.segmentation = segmentation
        self.info = {"description": f"exported by main.py export from {source}", "version": "1.0"}
        self.categories = [{"id": i, "name": name, "supercategory": "object"}
                           for i, name in enumerate(class_names) if i > 0]
        self.images: dict[str, list[dict]] = {}
        self.annotations: dict[str, list[dict]] = {}
        self.kinds: Counter = Counter()

    def add(self, item: Item, mask: np.ndarray, instances: Instances) -> None:
        height, width = mask.shape
        images = self.images.setdefault(item.split, [])
        annotations = self.annotations.setdefault(item.split, [])
        image_id = len(images) + 1
        _copy_new(item.image, self.folder / "images" / item.split / _image_name(item))
        images.append({"id": image_id, "file_name": _image_name(item), "width": width, "height": height})
        for instance in instances.kept:
            segmentation, kind = coco_segmentation(instance, height, width, self.segmentation)
            self.kinds[kind] += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": instance.class_id,
                                "segmentation": segmentation, "area": instance.area,
                                "bbox": [float(v) for v in instance.bbox], "iscrowd": 0})

    def close(self) -> None:
        for split, images in self.images.items():
            write_json(self.folder / "annotations" / f"instances_{split}.json",
                       {"info": self.info, "licenses": [], "images": images,
                        "annotations": self.annotations[split], "categories": self.categories})


class YoloWriter:
    """YOLO txt labels (`segment` polygons or `detect` boxes) beside a copy of the images, and data.yaml.

    YOLO finds a label by replacing `images` with `labels` in the image path, so each YOLO flavour has its own
    images/ tree. An image without objects gets an empty txt file (a negative example, as YOLO expects).
    """

    def __init__(self, folder: Path, class_names: list[str], task: str) -> None:
        self.folder = folder
        self.class_names = class_names
        self.task = task
        self.splits: list[str] = []

    def add(self, item: Item, mask: np.ndarray, instances: Instances) -> None:
        height, width = mask.shape
        if item.split not in self.splits:
            self.splits.append(item.split)
        _copy_new(item.image, self.folder / "images" / item.split / _image_name(item))
        line = yolo_segment_line if self.task == "segment" else yolo_box_line
        text = "".join(line(instance, width, height) + "\n" for instance in instances.kept)
        _write_new(self.folder / "labels" / item.split / f"{item.stem}.txt", text.encode("utf-8"))

    def close(self) -> None:
        train = "train" if "train" in self.splits else self.splits[0]
        val = next((s for s in ("val", "test") if s in self.splits), train)
        lines = [f"# YOLO {self.task} dataset written by main.py export; class i is class id i + 1 of classes.json",
                 f"path: {json.dumps(str(self.folder.resolve()))}",
                 f"train: images/{train}",
                 f"val: images/{val}" + ("  # no held-out split in the source" if val == train else ""),
                 f"nc: {len(self.class_names) - 1}",
                 "names:"]
        lines += [f"  {i - 1}: {json.dumps(name)}" for i, name in enumerate(self.class_names) if i > 0]
        _write_new(self.folder / "data.yaml", ("\n".join(lines) + "\n").encode("utf-8"))


class SemanticWriter:
    """This project's dataset layout: `semantic/<split>/{images,masks,colored_masks}/` with every pixel kept,
    plus classes.json and palette.json (colour -> class name, readable by `main.py import` format palette)."""

    def __init__(self, folder: Path, class_names: list[str]) -> None:
        self.folder = folder
        self.class_names = class_names
        self.colours = palette(len(class_names))

    def add(self, item: Item, mask: np.ndarray, instances: Instances) -> None:
        split = self.folder / item.split
        _copy_new(item.image, split / "images" / _image_name(item))
        _write_new(split / "masks" / f"{item.stem}.png", _png(mask.astype(np.uint8)))
        _write_new(split / "colored_masks" / f"{item.stem}.png", _png(self.colours[mask]))

    def close(self) -> None:
        write_json(self.folder / CLASSES_FILE, {"classes": self.class_names})
        write_json(self.folder / "palette.json",
                   {"#%02x%02x%02x" % tuple(int(c) for c in colour): name
                    for colour, name in zip(self.colours, self.class_names)})


# --------------------------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------------------------


def overlay(image: np.ndarray, mask: np.ndarray, instances: Instances, colours: np.ndarray) -> np.ndarray:
    """The image with the classes painted half-transparent and each kept instance's box drawn in its colour."""
    painted = image.astype(np.float32)
    labelled = mask > 0
    painted[labelled] = 0.5 * painted[labelled] + 0.5 * colours[mask[labelled]]
    canvas = Image.fromarray(painted.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    line = max(1, -(-max(mask.shape) // (CONTACT_CELL // 2)))  # about 2 px once shrunk into a contact-sheet cell
    for instance in instances.kept:
        x, y, w, h = instance.bbox
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=tuple(int(c) for c in colours[instance.class_id]),
                       width=line)
    return np.asarray(canvas)


def write_contact_sheet(folder: Path, cells: list[tuple[Item, np.ndarray, Counter]], class_names: list[str],
                        totals: Counter) -> None:
    """`contact_sheet.png` (overlays in a grid, 4 per row) and `contact_sheet.html` (legend, counts, the PNG):
    a quick look that masks, boxes and class names line up before a trainer is pointed at the export."""
    columns = min(4, len(cells))
    rows = (len(cells) + columns - 1) // columns
    label_height = 14
    sheet = Image.new("RGB", (columns * CONTACT_CELL, rows * (CONTACT_CELL + label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (item, picture, _) in enumerate(cells):
        thumb = Image.fromarray(picture)
        thumb.thumbnail((CONTACT_CELL - 4, CONTACT_CELL - 4), Image.Resampling.BILINEAR)
        left = (index % columns) * CONTACT_CELL
        top = (index // columns) * (CONTACT_CELL + label_height)
        sheet.paste(thumb, (left + (CONTACT_CELL - thumb.width) // 2, top + (CONTACT_CELL - thumb.height) // 2))
        draw.text((left + 2, top + CONTACT_CELL), item.stem[:30], fill=(0, 0, 0))
    sheet.save(folder / "contact_sheet.png")

    colours = palette(len(class_names))
    legend = "".join(
        f'<tr><td style="background:#{"%02x%02x%02x" % tuple(int(c) for c in colours[i])};width:2em"></td>'
        f"<td>{i}</td><td>{html.escape(name)}</td><td>{totals.get(i, 0)}</td></tr>"
        for i, name in enumerate(class_names))
    table = "".join(
        f"<tr><td>{html.escape(item.split)}</td><td>{html.escape(item.stem)}</td><td>"
        + ", ".join(f"{html.escape(class_names[c])}: {n}" for c, n in sorted(counts.items())) + "</td></tr>"
        for item, _, counts in cells)
    page = ("<!doctype html><meta charset='utf-8'><title>export contact sheet</title>"
            "<h1>Export contact sheet</h1><h2>Classes (objects in the whole export)</h2>"
            f"<table border=1 cellpadding=3><tr><th></th><th>id</th><th>name</th><th>objects</th></tr>{legend}</table>"
            f"<h2>First {len(cells)} images</h2><img src='contact_sheet.png' alt='contact sheet'>"
            f"<table border=1 cellpadding=3><tr><th>split</th><th>image</th><th>objects</th></tr>{table}</table>\n")
    (folder / "contact_sheet.html").write_text(page, encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def make_output_dir(config: ExportConfig) -> Path:
    """An empty `output_dir` (made if missing), else a fresh `<root_log_dir>/export_NNN`."""
    if not config.output_dir:
        return new_run_dir(config.root_log_dir, "export")
    folder = Path(config.output_dir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"key 'output_dir': {folder} is not an empty folder; an export never overwrites, "
                          "choose a new folder or leave output_dir empty for a fresh export_NNN run folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_export(config: ExportConfig, log=print) -> dict[str, Any]:
    """Export every item of the source into a fresh folder; return the summary (also in summary.json).

    Every mask is checked (class ids, sizes) before the output folder is made, so a bad source writes nothing.
    """
    source = find_source(config)
    for item in source.items:
        read_item_mask(item, source)
    out = make_output_dir(config)
    log(f"export folder: {out}")
    write_json(out / "config.json", config_to_dict(config))
    write_json(out / CLASSES_FILE, {"classes": source.class_names})

    builders = {"coco": lambda: CocoWriter(out / "coco", source.class_names, config.segmentation, config.source),
                "yolo-seg": lambda: YoloWriter(out / "yolo-seg", source.class_names, "segment"),
                "yolo-det": lambda: YoloWriter(out / "yolo-det", source.class_names, "detect"),
                "semantic": lambda: SemanticWriter(out / "semantic", source.class_names)}
    writers = [builders[name]() for name in config.formats]
    colours = palette(source.num_classes)
    objects: Counter = Counter()
    dropped = dropped_pixels = holes = 0
    cells: list[tuple[Item, np.ndarray, Counter]] = []
    for item in tqdm(source.items, desc="export", unit="image", dynamic_ncols=True):
        mask = read_item_mask(item, source)
        instances = find_instances(mask, source.num_classes, config.min_area, config.connectivity)
        for writer in writers:
            writer.add(item, mask, instances)
        counts = Counter(instance.class_id for instance in instances.kept)
        objects.update(counts)
        dropped += instances.dropped
        dropped_pixels += instances.dropped_pixels
        holes += sum(instance.has_holes for instance in instances.kept)
        if len(cells) < config.contact_sheet:
            cells.append((item, overlay(load_image(item.image), mask, instances, colours), counts))
    for writer in writers:
        writer.close()
    if cells:
        write_contact_sheet(out, cells, source.class_names, objects)

    coco = next((w for w in writers if isinstance(w, CocoWriter)), None)
    summary = {"source": config.source, "source_kind": source.kind, "images": len(source.items),
               "splits": dict(Counter(item.split for item in source.items)), "formats": list(config.formats),
               "num_classes": source.num_classes, "classes": source.class_names,
               "objects": sum(objects.values()),
               "objects_per_class": {source.class_names[c]: objects.get(c, 0) for c in range(1, source.num_classes)},
               "objects_with_holes": holes, "dropped_components": dropped, "dropped_pixels": dropped_pixels,
               "min_area": config.min_area,
               "coco_segmentations": dict(coco.kinds) if coco else {}}
    write_json(out / "summary.json", summary)
    log(f"exported {len(source.items)} images with {summary['objects']} objects ({', '.join(config.formats)}) "
        f"to {out}; {dropped} components under min_area={config.min_area} px left out")
    return {**summary, "output_dir": str(out)}
