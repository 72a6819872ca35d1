"""`main.py export`: COCO, YOLO and semantic files from labelled images, checked with pycocotools on real masks.

Most tests share one export of 20 magnetic-tile training masks (a spread over all five defect classes, one mask
with a hole in a defect, one with a 2-pixel speck, one without defects); the source objects are recomputed here
with scikit-image, independently of the exporter.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage import measure

import main
from conftest import MAGNETIC_TILE, write_config
from guided_diffusion.config import ExportConfig, config_from_dict
from guided_diffusion.data import load_mask
from guided_diffusion.errors import ConfigError, DatasetError
from guided_diffusion.interchange.export import coco_segmentation, find_instances, run_export
from guided_diffusion.run_folder import SampleWriter

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
needs_real_data = pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/datasets is not present")
CLASSES = ["background", "blowhole", "break", "crack", "fray", "uneven"]
WITH_HOLE, WITH_SPECK, DEFECT_FREE = "exp1_num_290998", "exp1_num_135544", "exp1_num_10334"
MIN_AREA = 4


def quiet(*_args, **_kwargs) -> None:
    pass


def source_objects(mask: np.ndarray, min_area: int = MIN_AREA) -> list[tuple[int, np.ndarray]]:
    """(class id, boolean mask) of each 8-connected component of a class with at least min_area pixels."""
    found = []
    for class_id in range(1, int(mask.max()) + 1):
        labels = measure.label(mask == class_id, connectivity=2)
        found += [(class_id, labels == k) for k in range(1, labels.max() + 1) if (labels == k).sum() >= min_area]
    return found


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading progress
        return COCO(str(path))


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """A dataset folder whose train/ links 20 magnetic-tile pairs (the shared files are used in place)."""
    root = tmp_path_factory.mktemp("subset") / "tiles"
    masks = sorted((MAGNETIC_TILE / "train" / "masks").glob("*.png"))
    with_defects = [m.stem for m in masks if np.asarray(Image.open(m)).any()]
    stems = sorted(set(with_defects[::16][:17]) | {WITH_HOLE, WITH_SPECK, DEFECT_FREE})
    for kind in ("images", "masks"):
        (root / "train" / kind).mkdir(parents=True)
    for stem in stems:
        (root / "train" / "images" / f"{stem}.jpg").symlink_to(MAGNETIC_TILE / "train" / "images" / f"{stem}.jpg")
        (root / "train" / "masks" / f"{stem}.png").symlink_to(MAGNETIC_TILE / "train" / "masks" / f"{stem}.png")
    (root / "classes.json").symlink_to(MAGNETIC_TILE / "classes.json")
    return root


@pytest.fixture(scope="module")
def exported(subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    run_export(ExportConfig(source=str(subset / "train"), output_dir=str(out), min_area=MIN_AREA), log=quiet)
    return out


def source_mask(subset: Path, stem: str) -> np.ndarray:
    return load_mask(subset / "train" / "masks" / f"{stem}.png", "multi-class")


# --------------------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------------------


@needs_real_data
def test_pycocotools_ann_to_mask_agrees_with_every_source_object(subset, exported):
    coco = load_coco(exported / "coco" / "annotations" / "instances_train.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES[1:]
    assert len(coco.getImgIds()) == 20
    checked = 0
    for image in coco.loadImgs(coco.getImgIds()):
        mask = source_mask(subset, Path(image["file_name"]).stem)
        assert (image["height"], image["width"]) == mask.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        objects = source_objects(mask)
        assert len(anns) == len(objects)
        for class_id, component in objects:
            best = max(((iou(component, coco.annToMask(a).astype(bool)), a["id"]) for a in anns
                        if a["category_id"] == class_id), default=(0.0, None))
            assert best[0] >= 0.99, f"{image['file_name']}: class {class_id} object IoU {best[0]:.4f}"
            ann = coco.loadAnns([best[1]])[0]
            rows, cols = np.nonzero(component)
            assert ann["area"] == component.sum()
            assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            checked += 1
    assert checked > 20  # the subset has objects of every class


@needs_real_data
def test_a_defect_with_a_hole_goes_out_as_rle_and_plain_shapes_as_polygons(exported):
    coco = load_coco(exported / "coco" / "annotations" / "instances_train.json")
    by_name = {Path(i["file_name"]).stem: i["id"] for i in coco.loadImgs(coco.getImgIds())}
    holed = coco.loadAnns(coco.getAnnIds(imgIds=[by_name[WITH_HOLE]]))
    assert any(isinstance(a["segmentation"], dict) for a in holed)
    kinds = [isinstance(a["segmentation"], list) for a in coco.loadAnns(coco.getAnnIds())]
    assert sum(kinds) > len(kinds) // 2  # most defects are plain shapes and stay polygons


@needs_real_data
def test_a_speck_under_min_area_is_left_out_of_coco_and_yolo_but_kept_in_the_semantic_mask(subset, exported):
    speck_mask = source_mask(subset, WITH_SPECK)
    assert len(source_objects(speck_mask, 1)) > len(source_objects(speck_mask, MIN_AREA))
    coco = load_coco(exported / "coco" / "annotations" / "instances_train.json")
    image_id = next(i["id"] for i in coco.loadImgs(coco.getImgIds()) if i["file_name"].startswith(WITH_SPECK))
    assert len(coco.getAnnIds(imgIds=[image_id])) == len(source_objects(speck_mask, MIN_AREA))
    lines = (exported / "yolo-det" / "labels" / "train" / f"{WITH_SPECK}.txt").read_text().splitlines()
    assert len(lines) == len(source_objects(speck_mask, MIN_AREA))
    kept = np.asarray(Image.open(exported / "semantic" / "train" / "masks" / f"{WITH_SPECK}.png"))
    assert np.array_equal(kept, speck_mask)
    assert json.loads((exported / "summary.json").read_text())["dropped_components"] >= 1


def test_find_instances_splits_classes_into_components_and_drops_small_ones():
    mask = np.zeros((12, 12), dtype=np.int64)
    mask[1:4, 1:4] = 1          # 9 px, class 1
    mask[6:8, 6:8] = 1          # 4 px, class 1, separate
    mask[10, 10] = 1            # 1 px speck
    mask[1:4, 4:6] = 2          # touches the first square but is another class
    mask[6, 9], mask[7, 10] = 3, 3  # diagonal neighbours: one object with 8-connectivity, two with 4
    found = find_instances(mask, 4, min_area=2)
    assert sorted((i.class_id, i.area) for i in found.kept) == [(1, 4), (1, 9), (2, 6), (3, 2)]
    assert (found.dropped, found.dropped_pixels) == (1, 1)
    assert [i.bbox for i in found.kept if i.class_id == 2] == [(4, 1, 2, 3)]
    assert sum(i.class_id == 3 for i in find_instances(mask, 4, min_area=1, connectivity=4).kept) == 2


def test_auto_segmentation_is_exact_for_random_shapes_and_a_ring_becomes_rle():
    rng = np.random.default_rng(0)
    for _ in range(30):
        noise = rng.random((40, 40)) < 0.45
        mask = measure.label(noise, connectivity=2)
        mask = (mask == np.bincount(mask.ravel())[1:].argmax() + 1).astype(np.int64)  # the largest blob
        (instance,) = find_instances(mask, 2, min_area=1).kept
        segmentation, _ = coco_segmentation(instance, 40, 40, "auto")
        rle = (mask_utils.merge(mask_utils.frPyObjects(segmentation, 40, 40)) if isinstance(segmentation, list)
               else {**segmentation, "counts": segmentation["counts"].encode()})
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask == 1)
    ring = np.zeros((10, 10), dtype=np.int64)
    ring[2:8, 2:8] = 1
    ring[4:6, 4:6] = 0
    (instance,) = find_instances(ring, 2, min_area=1).kept
    assert instance.has_holes
    assert coco_segmentation(instance, 10, 10, "auto")[1] == "rle"
    polygon, kind = coco_segmentation(instance, 10, 10, "polygon")  # forced: the outer boundary, hole filled
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 10, 10)))
    assert kind == "polygon" and drawn.sum() == 36


# --------------------------------------------------------------------------------------------------------------
# YOLO, semantic masks, contact sheet
# --------------------------------------------------------------------------------------------------------------


@needs_real_data
def test_yolo_files_parse_and_each_box_contains_its_polygon(exported):
    seg_dir, det_dir = exported / "yolo-seg" / "labels" / "train", exported / "yolo-det" / "labels" / "train"
    images = sorted((exported / "yolo-seg" / "images" / "train").iterdir())
    assert [p.stem for p in images] == sorted(p.stem for p in seg_dir.glob("*.txt"))
    objects = 0
    for image in images:
        seg_lines = (seg_dir / f"{image.stem}.txt").read_text().splitlines()
        det_lines = (det_dir / f"{image.stem}.txt").read_text().splitlines()
        assert len(seg_lines) == len(det_lines)
        for seg, det in zip(seg_lines, det_lines):
            seg_values, det_values = seg.split(), det.split()
            assert seg_values[0] == det_values[0] and 0 <= int(seg_values[0]) < len(CLASSES) - 1
            points = np.array([float(v) for v in seg_values[1:]]).reshape(-1, 2)
            assert len(points) >= 3 and points.min() >= 0 and points.max() <= 1
            cx, cy, w, h = (float(v) for v in det_values[1:])
            tolerance = 1e-5  # both files round to 6 decimals
            assert (points[:, 0] >= cx - w / 2 - tolerance).all() and (points[:, 0] <= cx + w / 2 + tolerance).all()
            assert (points[:, 1] >= cy - h / 2 - tolerance).all() and (points[:, 1] <= cy + h / 2 + tolerance).all()
            objects += 1
    assert (seg_dir / f"{DEFECT_FREE}.txt").read_text() == ""  # a negative example, as YOLO expects
    assert objects > 20


@needs_real_data
def test_yolo_data_yaml_points_at_the_images_and_names_the_classes(exported):
    yaml = pytest.importorskip("yaml")
    for flavour in ("yolo-seg", "yolo-det"):
        data = yaml.safe_load((exported / flavour / "data.yaml").read_text())
        assert (Path(data["path"]) / data["train"]).is_dir()
        assert data["names"] == dict(enumerate(CLASSES[1:])) and data["nc"] == len(CLASSES) - 1


@needs_real_data
def test_semantic_export_is_a_dataset_with_the_source_masks_names_and_palette(subset, exported):
    semantic = exported / "semantic"
    assert json.loads((semantic / "classes.json").read_text()) == {"classes": CLASSES}
    assert list(json.loads((semantic / "palette.json").read_text()).values()) == CLASSES
    for mask_path in (subset / "train" / "masks").iterdir():
        written = np.asarray(Image.open(semantic / "train" / "masks" / mask_path.name))
        assert np.array_equal(written, source_mask(subset, mask_path.stem))
        assert (semantic / "train" / "images" / f"{mask_path.stem}.jpg").read_bytes() == \
            (subset / "train" / "images" / f"{mask_path.stem}.jpg").read_bytes()


@needs_real_data
def test_contact_sheet_shows_the_first_images_and_a_class_legend(exported):
    sheet = Image.open(exported / "contact_sheet.png")
    assert sheet.width > 0 and sheet.height > 0
    page = (exported / "contact_sheet.html").read_text()
    assert all(name in page for name in CLASSES) and "contact_sheet.png" in page


# --------------------------------------------------------------------------------------------------------------
# Sources, output folders, errors
# --------------------------------------------------------------------------------------------------------------


def make_sample_run(run_dir: Path, data_dir: Path, num_classes: int = 3) -> list[np.ndarray]:
    """A folder as `main.py sample` writes it: synthetic images, class-id labels, config.json."""
    writer = SampleWriter(run_dir, num_classes)
    masks = []
    for i in range(3):
        mask = np.zeros((32, 32), dtype=np.int64)
        mask[4 + i : 12 + i, 5:20] = 1
        mask[20:28, 10 + i : 14 + i] = 2
        sample = np.full((32, 32, 3), 40 * i, dtype=np.uint8)
        writer.write(f"{i:05d}_x", sample, mask, None)
        masks.append(mask)
    (run_dir / "config.json").write_text(json.dumps({"num_classes": num_classes, "data_dir": str(data_dir)}))
    return masks


def test_export_of_a_sample_run_takes_the_synthetic_images_and_the_dataset_class_names(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "classes.json").write_text(json.dumps({"classes": ["background", "scratch", "spot"]}))
    run_dir = tmp_path / "Results" / "sample_001"
    masks = make_sample_run(run_dir, data_dir)
    summary = run_export(ExportConfig(source=str(run_dir), root_log_dir=str(tmp_path / "Results")), log=quiet)
    out = Path(summary["output_dir"])
    assert out == tmp_path / "Results" / "export_001" and summary["source_kind"] == "sample run"
    assert (out / "coco" / "images" / "train" / "00001_x.png").read_bytes() == \
        (run_dir / "samples" / "00001_x.png").read_bytes()
    coco = load_coco(out / "coco" / "annotations" / "instances_train.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["scratch", "spot"]
    for image in coco.loadImgs(coco.getImgIds()):
        mask = masks[int(image["file_name"][:5])]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask == ann["category_id"])
    again = run_export(ExportConfig(source=str(run_dir), root_log_dir=str(tmp_path / "Results")), log=quiet)
    assert Path(again["output_dir"]).name == "export_002"  # a second export never touches the first


def test_export_refuses_an_output_dir_that_is_not_empty_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "sample_001"
    make_sample_run(run_dir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"key 'output_dir': .*out is not an empty folder"):
        run_export(ExportConfig(source=str(run_dir), output_dir=str(out)), log=quiet)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_label_beyond_num_classes_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "sample_001"
    make_sample_run(run_dir, tmp_path, num_classes=3)
    (run_dir / "config.json").write_text(json.dumps({"num_classes": 2}))
    with pytest.raises(DatasetError, match=r"00000_x.png: class ids \[2\] outside 0..1"):
        run_export(ExportConfig(source=str(run_dir), output_dir=str(tmp_path / "out")), log=quiet)
    assert not (tmp_path / "out").exists()


def test_export_config_is_strict_about_formats_and_min_area():
    with pytest.raises(ConfigError, match="key 'formats' has unknown format 'voc'"):
        config_from_dict("export", {"source": "x", "formats": ["coco", "voc"]})
    with pytest.raises(ConfigError, match="key 'min_area' must be >= 0"):
        config_from_dict("export", {"source": "x", "min_area": -1})
    with pytest.raises(ConfigError, match="unknown key 'min_aera'.*did you mean 'min_area'"):
        config_from_dict("export", {"source": "x", "min_aera": 3})


def test_main_export_runs_and_a_missing_source_is_one_line_with_status_2(tmp_path, capsys):
    run_dir = tmp_path / "sample_001"
    make_sample_run(run_dir, tmp_path)
    config = write_config(tmp_path / "export.json", {"source": str(run_dir), "output_dir": str(tmp_path / "out"),
                                                     "formats": ["coco"]})
    assert main.main(["export", "-c", str(config)]) == 0
    assert (tmp_path / "out" / "coco" / "annotations" / "instances_train.json").is_file()
    assert not (tmp_path / "out" / "yolo-seg").exists()
    capsys.readouterr()  # drop the progress bar
    bad = write_config(tmp_path / "bad.json", {"source": str(tmp_path / "nowhere")})
    assert main.main(["export", "-c", str(bad)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "key 'source'" in error and "\n" not in error
