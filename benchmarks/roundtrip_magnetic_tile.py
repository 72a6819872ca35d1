"""Round-trip agreement of `main.py export` / `main.py import` on the whole magnetic-tile dataset.

    OMP_NUM_THREADS=1 python3 benchmarks/roundtrip_magnetic_tile.py [--data ../shared/datasets/magnetic-tile]
                                                                     [--min-area 4] [--keep DIR]

Exports train/ and test/ (COCO, YOLO seg + det, semantic), then measures, against the source masks:
- COCO: every source object (connected component of a class, 8-connected, >= min_area px) is matched to the
  annotation of the same image and class with the highest IoU of pycocotools' `annToMask`; IoU figures,
  polygon/RLE counts, and area / bbox agreement;
- YOLO: the segmentation polygon drawn by pycocotools against the hole-filled object (YOLO has no holes), and
  the detection box against the object's pixel box;
- import(export): the COCO files and the semantic colour masks + palette.json imported back, compared pixel by
  pixel with the source masks (and with the source minus the components under min_area).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage
from skimage import measure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guided_diffusion.config import ExportConfig, ImportConfig  # noqa: E402
from guided_diffusion.interchange.importing import run_import  # noqa: E402
from guided_diffusion.data import load_mask  # noqa: E402
from guided_diffusion.interchange.export import run_export  # noqa: E402


def objects(mask: np.ndarray, min_area: int) -> list[tuple[int, np.ndarray]]:
    """(class id, boolean mask) of every 8-connected component of a class with at least min_area pixels."""
    found = []
    for class_id in np.unique(mask):
        if class_id == 0:
            continue
        labels = measure.label(mask == class_id, connectivity=2)
        for k in range(1, labels.max() + 1):
            component = labels == k
            if component.sum() >= min_area:
                found.append((int(class_id), component))
    return found


def without_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The mask with every component under min_area set to background."""
    kept = np.zeros_like(mask)
    for class_id, component in objects(mask, min_area):
        kept[component] = class_id
    return kept


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def pixel_box(component: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(component)
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "magnetic-tile"))
    parser.add_argument("--min-area", type=int, default=4)
    parser.add_argument("--keep", default="", help="write the export and imports here (an empty folder)")
    args = parser.parse_args()
    if args.keep:
        measure_round_trip(Path(args.data), args.min_area, Path(args.keep))
        print(f"files kept in {args.keep}")
    else:
        with tempfile.TemporaryDirectory(prefix="roundtrip_") as scratch:
            measure_round_trip(Path(args.data), args.min_area, Path(scratch))


def measure_round_trip(data: Path, min_area: int, work: Path) -> None:
    """Export `data`, import the COCO and colour-mask outputs back into `work`, and print the agreement."""
    quiet = lambda *a, **k: None  # noqa: E731

    started = time.perf_counter()
    summary = run_export(ExportConfig(source=str(data), output_dir=str(work / "export"), min_area=min_area),
                         log=quiet)
    export_seconds = time.perf_counter() - started
    export = Path(summary["output_dir"])
    splits = [s for s in ("train", "test") if (data / s).is_dir()]

    started = time.perf_counter()
    coco_args = {"format": "coco", "output_dir": str(work / "import_coco"),
                 "train_images": str(export / "coco/images/train"),
                 "train_labels": str(export / "coco/annotations/instances_train.json")}
    palette_args = {"format": "palette", "output_dir": str(work / "import_palette"),
                    "palette": str(export / "semantic/palette.json"),
                    "train_images": str(export / "semantic/train/images"),
                    "train_labels": str(export / "semantic/train/colored_masks")}
    if "test" in splits:
        coco_args |= {"test_images": str(export / "coco/images/test"),
                      "test_labels": str(export / "coco/annotations/instances_test.json")}
        palette_args |= {"test_images": str(export / "semantic/test/images"),
                         "test_labels": str(export / "semantic/test/colored_masks")}
    run_import(ImportConfig(**coco_args), log=quiet)
    run_import(ImportConfig(**palette_args), log=quiet)
    import_seconds = time.perf_counter() - started

    ious, polygon_ious, unmatched, area_ok, bbox_ok, det_ok, yolo_objects = [], [], 0, 0, 0, 0, 0
    pixels = same_pixels = same_pixels_kept = exact_images = exact_images_kept = palette_exact = images = 0
    annotations = 0
    for split in splits:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading progress
            coco = COCO(str(export / f"coco/annotations/instances_{split}.json"))
        for image in coco.dataset["images"]:
            stem = Path(image["file_name"]).stem
            source = load_mask(data / split / "masks" / f"{stem}.png", "multi-class")
            height, width = source.shape
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            annotations += len(anns)
            drawn = [(a["category_id"], coco.annToMask(a).astype(bool), a) for a in anns]
            seg_lines = (export / f"yolo-seg/labels/{split}/{stem}.txt").read_text().splitlines()
            det_lines = (export / f"yolo-det/labels/{split}/{stem}.txt").read_text().splitlines()
            for class_id, component in objects(source, min_area):
                same = [(iou(component, m), a) for c, m, a in drawn if c == class_id]
                if not same:
                    unmatched += 1
                    continue
                best, ann = max(same, key=lambda pair: pair[0])
                ious.append(best)
                area_ok += ann["area"] == int(component.sum())
                bbox_ok += [int(v) for v in ann["bbox"]] == list(pixel_box(component))
            for seg, det in zip(seg_lines, det_lines):
                yolo_objects += 1
                values = [float(v) for v in seg.split()[1:]]
                xy = (np.array(values).reshape(-1, 2) * [width, height]).ravel().tolist()
                polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([xy], height, width))).astype(bool)
                cx, cy, bw, bh = (float(v) for v in det.split()[1:])
                box = ((cx - bw / 2) * width, (cy - bh / 2) * height, bw * width, bh * height)
                match = max(((iou(ndimage.binary_fill_holes(m), polygon), a) for c, m, a in drawn
                             if c == int(seg.split()[0]) + 1), key=lambda pair: pair[0])
                polygon_ious.append(match[0])
                det_ok += np.allclose(box, match[1]["bbox"], atol=1e-3)
            back = load_mask(work / f"import_coco/{split}/masks/{stem}.png", "multi-class")
            kept = without_small(source, min_area)
            pixels += source.size
            images += 1
            same_pixels += int((back == source).sum())
            same_pixels_kept += int((back == kept).sum())
            exact_images += bool(np.array_equal(back, source))
            exact_images_kept += bool(np.array_equal(back, kept))
            palette_back = np.asarray(Image.open(work / f"import_palette/{split}/masks/{stem}.png"))
            palette_exact += bool(np.array_equal(palette_back, source))

    ious_array, polygon_array = np.array(ious), np.array(polygon_ious)
    kinds = summary["coco_segmentations"]
    print(f"magnetic-tile round trip ({', '.join(f'{s} {n}' for s, n in summary['splits'].items())} images, "
          f"min_area {min_area} px, 8-connected components)")
    print(f"export: {export_seconds:.1f} s for {images} images; import (COCO + palette): {import_seconds:.1f} s")
    print(f"objects: {len(ious) + unmatched} in the source masks >= min_area, {annotations} COCO annotations "
          f"({kinds.get('polygon', 0)} polygons, {kinds.get('rle', 0)} RLE; {summary['objects_with_holes']} "
          f"with holes), {summary['dropped_components']} components ({summary['dropped_pixels']} px) under "
          f"min_area left out")
    print(f"COCO annToMask vs source object: IoU min {ious_array.min():.4f}, mean {ious_array.mean():.6f}, "
          f"exact (IoU 1) {int((ious_array == 1).sum())}/{len(ious_array)}, >= 0.99 "
          f"{int((ious_array >= 0.99).sum())}/{len(ious_array)}, unmatched {unmatched}; area equal "
          f"{area_ok}/{len(ious)}, bbox equal {bbox_ok}/{len(ious)}")
    print(f"YOLO-seg polygon vs hole-filled object: IoU min {polygon_array.min():.4f}, mean "
          f"{polygon_array.mean():.6f} over {yolo_objects} objects; YOLO-det box = COCO bbox (1e-3 px): "
          f"{det_ok}/{yolo_objects}")
    print(f"import(export) via COCO: pixels equal to the source {same_pixels / pixels:.8f} "
          f"({pixels - same_pixels} of {pixels} differ), images identical {exact_images}/{images}; "
          f"against the source without components < min_area: {same_pixels_kept / pixels:.8f}, "
          f"identical {exact_images_kept}/{images}")
    print(f"import(export) via semantic colour masks + palette.json: images identical {palette_exact}/{images}")


if __name__ == "__main__":
    main()
