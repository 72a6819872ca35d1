"""`main.py import`: labels made by other tools, converted into this project's dataset layout.

The result is a dataset folder that `train`, `sample` and `evaluate` read as it is::

    <output_dir>/train/images/<stem>.<ext>   the images, copied unchanged
    <output_dir>/train/masks/<stem>.png      class ids (uint8), 0 = background
    <output_dir>/test/...                    when test_images / test_labels are given
    <output_dir>/classes.json                {"classes": [names by class id]}
    <output_dir>/import.json                 the import config and what was converted

Three input formats (`format`):

- `coco`: a COCO instances JSON and its image folder. Category ids are sorted and numbered 1, 2, ... (class 0
  is background), so the categories 1..K of an export come back as the same ids. Where objects overlap, the
  rule `overlap` decides: "smaller-wins" (default) paints larger objects first, so a small defect on a large
  region keeps its pixels; "later-wins" paints in file order. Equal areas: the later annotation wins. Crowd
  annotations are painted like the others.
- `palette`: colour masks (RGB or paletted PNG) and a palette JSON mapping colours to classes.
- `id-map`: integer id maps (Cityscapes `*_labelIds.png`) and a JSON mapping each id to a class id; ids mapped
  to "ignore" become `ignore_label` (0 = background, or 255).

Everything is checked before the output folder is touched, so a mistake writes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ..config import ImportConfig, config_to_dict
from ..data import CLASSES_FILE, IMAGE_EXTENSIONS, index_dataset, load_mask
from ..errors import ConfigError, DatasetError
from ..run_folder import write_json

LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a jpg colour mask has stray colours
MAX_CLASSES = 256  # masks are written as uint8
_MAX_LISTED = 5


def _listing(names: list[str]) -> str:
    shown = ", ".join(str(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: {what} is not valid JSON (line {error.lineno}, column {error.colno}: "
                           f"{error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: {what} cannot be read ({type(error).__name__})") from None


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # any decoder failure on a user file is a data problem
        raise DatasetError(f"{path}: cannot be read as an image ({str(error)[:80]})") from None


@dataclass(frozen=True)
class Job:
    """One image to import: where its image and its labels come from, and the stem it gets."""

    stem: str
    image: Path
    label: Any  # a label file (palette, id-map) or the image's COCO annotations
    origin: Path  # the file the labels come from (the label file or the COCO JSON), for error messages
    size: tuple[int, int] | None = None  # (height, width), known for COCO


@dataclass(frozen=True)
class Plan:
    """What an import will write: the classes, the jobs per split and how to make a job's class-id mask."""

    class_names: list[str]
    splits: dict[str, list[Job]]
    make_mask: Callable[[Job], np.ndarray]
    check_all_labels: bool  # convert every label once before writing (palette, id-map: colours/ids are checked)


# --------------------------------------------------------------------------------------------------------------
# Pairing image and label files (palette, id-map)
# --------------------------------------------------------------------------------------------------------------


def _files_by_key(folder: Path, extensions: tuple[str, ...], suffix: str, key: str) -> dict[str, Path]:
    """Files under `folder` (recursively, e.g. Cityscapes' city folders) keyed by stem minus `suffix`.

    With a suffix only files whose stem ends with it are taken (a Cityscapes gtFine folder also holds
    `_color.png` and `_instanceIds.png`)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        stem = path.stem
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        found.setdefault(stem, []).append(path)
    clashes = [" and ".join(str(p.relative_to(folder)) for p in paths) for paths in found.values() if len(paths) > 1]
    if clashes:
        raise DatasetError(f"key '{key}': several files in {folder} give the same name ({_listing(clashes)}); "
                           "rename them, they would overwrite each other")
    return {stem: paths[0] for stem, paths in found.items()}


def pair_files(images_dir: Path, labels_dir: Path, split: str, image_suffix: str = "",
               label_suffix: str = "") -> list[Job]:
    """Match images to label files by name (after removing the suffixes); every file must have its partner."""
    images = _files_by_key(images_dir, IMAGE_EXTENSIONS, image_suffix, f"{split}_images")
    labels = _files_by_key(labels_dir, LABEL_EXTENSIONS, label_suffix, f"{split}_labels")
    lonely_images, lonely_labels = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    problems = []
    if lonely_images:
        problems.append(f"{len(lonely_images)} images in {images_dir} without a label file "
                        f"({_listing(lonely_images)})")
    if lonely_labels:
        problems.append(f"{len(lonely_labels)} label files in {labels_dir} without an image "
                        f"({_listing(lonely_labels)})")
    if problems:
        hint = "; set image_suffix / label_suffix when the names differ by a fixed ending" if lonely_images else ""
        raise DatasetError("; ".join(problems) + hint)
    if not images:
        raise DatasetError(f"key '{split}_labels': no label files ({'/'.join(LABEL_EXTENSIONS)}) in {labels_dir}")
    return [Job(stem, images[stem], labels[stem], labels[stem]) for stem in sorted(images)]


# --------------------------------------------------------------------------------------------------------------
# Colour masks
# --------------------------------------------------------------------------------------------------------------

_HEX = re.compile(r"#?([0-9a-fA-F]{6})")
_TRIPLE = re.compile(r"\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*")


def parse_colour(text: str, path: Path) -> tuple[int, int, int]:
    """'#rrggbb', 'rrggbb' or 'r,g,b' as an (r, g, b) tuple."""
    if match := _HEX.fullmatch(text.strip()):
        value = int(match.group(1), 16)
        return (value >> 16) & 255, (value >> 8) & 255, value & 255
    if (match := _TRIPLE.fullmatch(text)) and all(int(v) <= 255 for v in match.groups()):
        return tuple(int(v) for v in match.groups())  # type: ignore[return-value]
    raise DatasetError(f"{path}: {text!r} is not a colour; write '#rrggbb' or 'r,g,b'")


def _hex(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour


def read_palette(path: Path) -> tuple[dict[int, int], list[str]]:
    """Read a palette file: {colour: class}. Returns packed colour (r << 16 | g << 8 | b) -> class id, and names.

    Two forms: values are class names (`{"#000000": "background", "#ff0000": "crack"}`; ids in order of first
    appearance, so list the background first), or class ids, optionally with names
    (`{"colors": {"#000000": 0, "#ff0000": 1}, "classes": ["background", "crack"]}`). Several colours may map to
    one class.
    """
    content = _read_json(path, "the palette")
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: the palette must be a JSON object mapping colours to classes")
    mapping = content.get("colors", {k: v for k, v in content.items() if k != "classes"})
    names = content.get("classes")
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f"{path}: the palette maps no colours; write {{\"#000000\": \"background\", ...}}")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)):
        raise DatasetError(f"{path}: 'classes' must be a list of class names")
    values = list(mapping.values())
    lookup: dict[int, int] = {}
    if all(isinstance(v, str) for v in values):
        order = list(names or [])
        for value in values:
            if value not in order:
                if names is not None:
                    raise DatasetError(f"{path}: class {value!r} is not in the palette's 'classes' list")
                order.append(value)
        ids = [order.index(v) for v in values]
        names = order
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        ids = values
        bad = [v for v in ids if not 0 <= v < (len(names) if names else MAX_CLASSES)]
        if bad:
            limit = f"0..{len(names) - 1} (its 'classes' list)" if names else f"0..{MAX_CLASSES - 1}"
            raise DatasetError(f"{path}: class ids {sorted(set(bad))} outside {limit}")
        names = names or [f"class_{i}" for i in range(max(ids) + 1)]
    else:
        raise DatasetError(f"{path}: palette values must all be class names or all class ids, not a mix")
    for key, class_id in zip(mapping, ids):
        r, g, b = parse_colour(key, path)
        packed = (r << 16) | (g << 8) | b
        if packed in lookup and lookup[packed] != class_id:
            raise DatasetError(f"{path}: colour {_hex((r, g, b))} is given twice with different classes")
        lookup[packed] = class_id
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"{path}: {len(names)} classes; at most {MAX_CLASSES} fit in uint8 masks")
    return lookup, list(names)


def read_colour_mask(path: Path) -> np.ndarray:
    """A colour mask as packed uint32 colours (r << 16 | g << 8 | b); paletted PNGs are looked up, alpha dropped."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint32)
    except Exception as error:  # any decoder failure on a user file is a data problem
        raise DatasetError(f"{path}: cannot be read as an image ({str(error)[:80]})") from None
    return (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]


def colours_to_ids(packed: np.ndarray, lookup: dict[int, int], mask_path: Path, palette_path: Path) -> np.ndarray:
    """Class ids of a packed colour mask; a colour missing from the palette is an error naming both files."""
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    unknown = [(int(c), int(n)) for c, n in zip(colours, counts) if int(c) not in lookup]
    if unknown:
        shown = ", ".join(f"{_hex(((c >> 16) & 255, (c >> 8) & 255, c & 255))} ({n} px)" for c, n in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise DatasetError(f"{mask_path}: colours {shown}{more} are not in the palette {palette_path}; "
                           "add them to the palette file")
    ids = np.array([lookup[int(c)] for c in colours], dtype=np.uint8)
    return ids[inverse].reshape(packed.shape)


# --------------------------------------------------------------------------------------------------------------
# Id maps
# --------------------------------------------------------------------------------------------------------------


def read_id_mapping(path: Path, ignore_label: int) -> tuple[np.ndarray, int, list[str]]:
    """Read `{"mapping": {"<id>": <class id> | "ignore"}, "default": ..., "classes": [...]}`.

    Returns a lookup table (label id -> class id; -1 = not mapped, an error when met), the class id used for
    ids without an entry (-1 when there is no "default") and the class names. "ignore" (or 255) becomes
    `ignore_label`. Without "classes" the classes are named class_<i> up to the largest class id.
    """
    content = _read_json(path, "the id mapping")
    if not isinstance(content, dict) or not isinstance(content.get("mapping"), dict) or not content["mapping"]:
        raise DatasetError(f"{path}: expected {{\"mapping\": {{\"<label id>\": <class id> or \"ignore\", ...}}, "
                           "\"classes\": [names]}")
    names = content.get("classes")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)):
        raise DatasetError(f"{path}: 'classes' must be a list of class names")

    def target(value: Any, where: str) -> int:
        if value == "ignore" or value == 255:
            return ignore_label
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 255:
            raise DatasetError(f"{path}: {where} maps to {value!r}; use a class id 0..254 or \"ignore\"")
        if names is not None and value >= len(names):
            raise DatasetError(f"{path}: {where} maps to class {value} but 'classes' names only {len(names)}")
        return value

    pairs = []
    for key, value in content["mapping"].items():
        if not re.fullmatch(r"\d+", key.strip()) or int(key) > 65535:
            raise DatasetError(f"{path}: mapping key {key!r} is not a label id (0..65535)")
        pairs.append((int(key), target(value, f"id {key}")))
    default = target(content["default"], "'default'") if "default" in content else -1
    table = np.full(max(i for i, _ in pairs) + 1, -1, dtype=np.int64)
    for label_id, class_id in pairs:
        table[label_id] = class_id
    classes = [c for c in [c for _, c in pairs] + [default] if 0 <= c < 255]  # 255 = ignore is not a class
    count = len(names) if names is not None else max(max(classes, default=0) + 1, 2)
    return table, default, list(names) if names is not None else [f"class_{i}" for i in range(count)]


def ids_to_classes(ids: np.ndarray, table: np.ndarray, default: int, mask_path: Path,
                   mapping_path: Path) -> np.ndarray:
    """Class ids of an id map through the lookup table; an id without an entry is an error naming both files."""
    values, inverse = np.unique(ids.ravel(), return_inverse=True)
    mapped = np.array([table[v] if v < len(table) else -1 for v in values], dtype=np.int64)
    mapped[mapped < 0] = default
    missing = values[mapped < 0].tolist()
    if missing:
        raise DatasetError(f"{mask_path}: label ids {_listing(missing)} are not in the mapping {mapping_path}; "
                           "add them (or a \"default\") to the mapping file")
    return mapped.astype(np.uint8)[inverse].reshape(ids.shape)


# --------------------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------------------


def _coco_lists(data: Any, path: Path) -> tuple[list, list, list]:
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO file is a JSON object with 'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path}: no {', '.join(repr(k) for k in missing)} list; is this a COCO instances file?")
    return data["images"], data["annotations"], data["categories"]


def coco_classes(categories: list, path: Path) -> tuple[dict[int, int], list[str]]:
    """Category id -> class id (categories sorted by id, numbered from 1) and the class names (background first)."""
    seen: dict[int, str] = {}
    for category in categories:
        if not isinstance(category, dict) or isinstance(category.get("id"), bool) \
                or not isinstance(category.get("id"), int) or not isinstance(category.get("name"), str):
            raise DatasetError(f"{path}: category {category!r} needs an integer 'id' and a 'name'")
        if category["id"] in seen:
            raise DatasetError(f"{path}: category id {category['id']} is listed twice")
        seen[category["id"]] = category["name"]
    if not seen:
        raise DatasetError(f"{path}: 'categories' is empty")
    if len(seen) >= MAX_CLASSES:
        raise DatasetError(f"{path}: {len(seen)} categories; at most {MAX_CLASSES - 1} fit in uint8 masks")
    ordered = sorted(seen)
    return {cid: i + 1 for i, cid in enumerate(ordered)}, ["background"] + [seen[cid] for cid in ordered]


def _check_segmentation(annotation: dict, path: Path) -> None:
    segmentation = annotation.get("segmentation")
    ok = (isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation)) or (
        isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation)
    if not ok:
        raise DatasetError(f"{path}: annotation {annotation.get('id')} has no polygon list or RLE 'segmentation'")


def plan_coco(json_path: Path, images_dir: Path, split: str) -> tuple[list[Job], dict[int, int], list[str]]:
    """Check a COCO file against its images and list one job per image (with its annotations).

    Errors: an annotation whose category or image id is not listed, a listed image not found under
    `images_dir` (tried as `file_name`, then its base name), an image whose size differs from its entry.
    """
    images, annotations, categories = _coco_lists(_read_json(json_path, "the COCO file"), json_path)
    class_of, names = coco_classes(categories, json_path)
    by_id: dict[Any, dict] = {}
    for image in images:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DatasetError(f"{json_path}: image entry {image!r} needs an 'id' and a 'file_name'")
        by_id[image["id"]] = image
    per_image: dict[Any, list[dict]] = {image_id: [] for image_id in by_id}
    bad_category, bad_image = [], []
    for annotation in annotations:
        if not isinstance(annotation, dict):
            raise DatasetError(f"{json_path}: annotation {annotation!r} is not an object")
        if annotation.get("category_id") not in class_of:
            bad_category.append(annotation)
        elif annotation.get("image_id") not in by_id:
            bad_image.append(annotation)
        else:
            _check_segmentation(annotation, json_path)
            per_image[annotation["image_id"]].append(annotation)
    if bad_category:
        first = bad_category[0]
        unknown = _listing(sorted({str(a.get("category_id")) for a in bad_category}))
        raise DatasetError(f"{json_path}: {len(bad_category)} annotations have unknown category ids {unknown} "
                           f"(first: annotation {first.get('id')} of image {first.get('image_id')}); the categories "
                           f"have ids {_listing(sorted(class_of))}")
    if bad_image:
        first = bad_image[0]
        raise DatasetError(f"{json_path}: {len(bad_image)} annotations refer to images missing from 'images' "
                           f"(first: annotation {first.get('id')} -> image_id {first.get('image_id')!r})")

    jobs, missing, stems = [], [], {}
    for image_id, image in by_id.items():
        name = image["file_name"]
        candidates = [images_dir / name, images_dir / Path(name).name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(f"{name} ({len(per_image[image_id])} annotations)")
            continue
        if found.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DatasetError(f"{found}: not an image type this project reads ({', '.join(IMAGE_EXTENSIONS)})")
        if found.stem in stems:
            raise DatasetError(f"{json_path}: images {stems[found.stem]} and {name} would get the same name "
                               f"{found.stem!r}; rename one")
        stems[found.stem] = name
        width, height = _image_size(found)
        if (image.get("width", width), image.get("height", height)) != (width, height):
            raise DatasetError(f"{found}: the image is {width}x{height} but {json_path.name} says "
                               f"{image.get('width')}x{image.get('height')}")
        jobs.append(Job(found.stem, found, per_image[image_id], json_path, (height, width)))
    if missing:
        raise DatasetError(f"{json_path}: {len(missing)} images listed there are not in {images_dir} "
                           f"({_listing(missing)}); check key '{split}_images'")
    if not jobs:
        raise DatasetError(f"{json_path}: 'images' is empty")
    return sorted(jobs, key=lambda job: job.stem), class_of, names


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """An annotation's pixels as pycocotools draws them: polygons (merged), uncompressed or compressed RLE.

    Polygons with fewer than 3 points draw nothing (pycocotools would read 2 points as a box)."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"an RLE of size {list(mask.shape)} on an image of {height}x{width}")
    return mask


def paint_instances(shapes: list[tuple[np.ndarray, int]], height: int, width: int, overlap: str) -> np.ndarray:
    """Class-id mask from (boolean mask, class id) pairs in file order, overlaps settled by `overlap`.

    "smaller-wins" paints by decreasing area (ties in file order), "later-wins" in file order; the last paint
    of a pixel stays."""
    order = list(range(len(shapes)))
    if overlap == "smaller-wins":
        areas = [int(m.sum()) for m, _ in shapes]
        order.sort(key=lambda i: -areas[i])  # stable: equal areas keep file order, so the later one wins
    mask = np.zeros((height, width), dtype=np.uint8)
    for i in order:
        pixels, class_id = shapes[i]
        mask[pixels] = class_id
    return mask


def coco_job_mask(job: Job, class_of: dict[int, int], overlap: str) -> np.ndarray:
    """The class-id mask of one COCO image from its annotations."""
    height, width = job.size
    shapes = []
    for annotation in job.label:
        try:
            pixels = annotation_mask(annotation["segmentation"], height, width)
        except (DatasetError, ValueError, TypeError, KeyError) as error:  # a malformed polygon or RLE
            raise DatasetError(f"{job.origin}: annotation {annotation.get('id')} has a segmentation that cannot "
                               f"be drawn ({str(error)[:80]})") from None
        shapes.append((pixels, class_of[annotation["category_id"]]))
    return paint_instances(shapes, height, width, overlap)


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def _split_sources(config: ImportConfig) -> dict[str, tuple[Path, Path]]:
    """The given splits' (images folder, labels path); missing paths are errors naming the key."""
    splits = {"train": (config.train_images, config.train_labels)}
    if config.test_images:
        splits["test"] = (config.test_images, config.test_labels)
    result = {}
    for split, (images, labels) in splits.items():
        images, labels = Path(images), Path(labels)
        if not images.is_dir():
            raise ConfigError(f"key '{split}_images': folder {images} not found")
        wants_file = config.format == "coco"
        if not (labels.is_file() if wants_file else labels.is_dir()):
            raise ConfigError(f"key '{split}_labels': {'file' if wants_file else 'folder'} {labels} not found")
        result[split] = (images, labels)
    return result


def plan_import(config: ImportConfig) -> Plan:
    """Read the palette / mapping / COCO files, pair every image with its labels and check them."""
    sources = _split_sources(config)
    if config.format == "coco":
        splits, class_ofs, names_of = {}, {}, {}
        for split, (images, labels) in sources.items():
            splits[split], class_ofs[split], names_of[split] = plan_coco(labels, images, split)
        if "test" in splits and (names_of["test"], class_ofs["test"]) != (names_of["train"], class_ofs["train"]):
            raise DatasetError(f"{sources['test'][1]}: its categories differ from those of {sources['train'][1]} "
                               f"({names_of['test'][1:]} vs {names_of['train'][1:]}); use one category list")
        class_of = class_ofs["train"]
        return Plan(names_of["train"], splits, lambda job: coco_job_mask(job, class_of, config.overlap),
                    check_all_labels=False)

    splits = {split: pair_files(images, labels, split, config.image_suffix, config.label_suffix)
              for split, (images, labels) in sources.items()}
    if config.format == "palette":
        palette_path = Path(config.palette)
        if not palette_path.is_file():
            raise ConfigError(f"key 'palette': file {palette_path} not found")
        lookup, names = read_palette(palette_path)
        return Plan(names, splits, lambda job: colours_to_ids(read_colour_mask(job.label), lookup, job.label,
                                                              palette_path), check_all_labels=True)
    mapping_path = Path(config.id_mapping)
    if not mapping_path.is_file():
        raise ConfigError(f"key 'id_mapping': file {mapping_path} not found")
    table, default, names = read_id_mapping(mapping_path, config.ignore_label)
    return Plan(names, splits, lambda job: ids_to_classes(load_mask(job.label, "multi-class"), table, default,
                                                          job.label, mapping_path), check_all_labels=True)


def _check_output_dir(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"key 'output_dir': {folder} is not an empty folder; an import never overwrites, "
                          "choose a new folder")


def _copy_new(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "xb") as writer:
        shutil.copyfileobj(reader, writer)


def run_import(config: ImportConfig, log=print) -> dict[str, Any]:
    """Convert the labels into `output_dir` in this project's layout; return the summary (also in import.json)."""
    out = Path(config.output_dir)
    _check_output_dir(out)
    plan = plan_import(config)
    jobs = [(split, job) for split, split_jobs in plan.splits.items() for job in split_jobs]
    if plan.check_all_labels:  # every colour / id is checked before anything is written
        for _, job in tqdm(jobs, desc="check labels", unit="mask", dynamic_ncols=True):
            mask = plan.make_mask(job)
            width, height = _image_size(job.image)
            if mask.shape != (height, width):
                raise DatasetError(f"{job.label}: the labels are {mask.shape[1]}x{mask.shape[0]} but the image "
                                   f"{job.image.name} is {width}x{height}")
    out.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(MAX_CLASSES, dtype=np.int64)
    for split, job in tqdm(jobs, desc="import", unit="image", dynamic_ncols=True):
        mask = plan.make_mask(job)
        _copy_new(job.image, out / split / "images" / (job.stem + job.image.suffix.lower()))
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        with open(out / split / "masks" / f"{job.stem}.png", "xb") as handle:
            Image.fromarray(mask).save(handle, format="PNG")
        pixels += np.bincount(mask.ravel(), minlength=MAX_CLASSES)
    write_json(out / CLASSES_FILE, {"classes": plan.class_names})
    num_classes = len(plan.class_names)
    summary = {"format": config.format, "images": {split: len(j) for split, j in plan.splits.items()},
               "num_classes": num_classes, "classes": plan.class_names,
               "pixels_per_class": {name: int(pixels[i]) for i, name in enumerate(plan.class_names)}}
    if config.ignore_label == 255:
        summary["ignored_pixels"] = int(pixels[255])
    write_json(out / "import.json", {"config": config_to_dict(config), "summary": summary})
    if config.ignore_label == 0:  # the result must be a dataset train/sample accept as it is
        index_dataset(out, "multi-class", num_classes, require_test="test" in plan.splits)
    log(f"imported {len(jobs)} images ({', '.join(f'{s}: {len(j)}' for s, j in plan.splits.items())}) with "
        f"{num_classes} classes into {out}; use data_dir={out}, num_classes={num_classes}, "
        "dataset_mode multi-class")
    return {**summary, "output_dir": str(out)}
