"""`main.py import`: COCO JSON, colour masks and id maps into this project's layout, and classes.json.

The round trips use 20 magnetic-tile training masks (the shared files, linked in place); the other tests build
tiny label files of their own so that each shows one rule or one error message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import measure

import main
from conftest import MAGNETIC_TILE, write_config
from guided_diffusion.config import ExportConfig, ImportConfig, config_from_dict
from guided_diffusion.interchange.importing import run_import
from guided_diffusion.data import index_dataset, load_mask, read_class_names
from guided_diffusion.errors import ConfigError, DatasetError
from guided_diffusion.interchange.export import run_export

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
needs_real_data = pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="../shared/datasets is not present")
CLASSES = ["background", "blowhole", "break", "crack", "fray", "uneven"]
MIN_AREA = 4


def quiet(*_args, **_kwargs) -> None:
    pass


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def without_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The mask with every 8-connected component of a class smaller than min_area turned into background."""
    kept = mask.copy()
    for class_id in range(1, int(mask.max()) + 1):
        labels = measure.label(mask == class_id, connectivity=2)
        sizes = np.bincount(labels.ravel())
        kept[(labels > 0) & (sizes[labels] < min_area)] = 0
    return kept


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """A split folder linking 20 magnetic-tile pairs with defects, from every fifteenth such mask."""
    root = tmp_path_factory.mktemp("tiles") / "train"
    masks = sorted((MAGNETIC_TILE / "train" / "masks").glob("*.png"))
    stems = [m.stem for m in masks if read_png(m).any()][::15][:20]
    for kind, ext in (("images", ".jpg"), ("masks", ".png")):
        (root / kind).mkdir(parents=True)
        for stem in stems:
            (root / kind / f"{stem}{ext}").symlink_to(MAGNETIC_TILE / "train" / kind / f"{stem}{ext}")
    (root.parent / "classes.json").symlink_to(MAGNETIC_TILE / "classes.json")
    return root


@pytest.fixture(scope="module")
def exported(tiles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    run_export(ExportConfig(source=str(tiles), output_dir=str(out), min_area=MIN_AREA,
                            formats=["coco", "semantic"], contact_sheet=0), log=quiet)
    return out


# --------------------------------------------------------------------------------------------------------------
# Round trips on magnetic-tile
# --------------------------------------------------------------------------------------------------------------


@needs_real_data
def test_import_of_the_coco_export_gives_back_the_masks_up_to_dropped_specks(tiles, exported, tmp_path):
    out = tmp_path / "dataset"
    run_import(ImportConfig(format="coco", output_dir=str(out), train_images=str(exported / "coco/images/train"),
                            train_labels=str(exported / "coco/annotations/instances_train.json")), log=quiet)
    assert read_class_names(out) == CLASSES
    assert len(index_dataset(out, "multi-class", len(CLASSES), require_test=False).train) == 20
    for source in sorted((tiles / "masks").iterdir()):
        expected = without_small_components(load_mask(source, "multi-class"), MIN_AREA)
        assert np.array_equal(read_png(out / "train" / "masks" / source.name), expected), source.name
        image = f"{source.stem}.jpg"
        assert (out / "train" / "images" / image).read_bytes() == (tiles / "images" / image).read_bytes()


@needs_real_data
def test_palette_import_of_the_exported_colour_masks_gives_back_every_pixel(tiles, exported, tmp_path):
    out = tmp_path / "dataset"
    semantic = exported / "semantic"
    run_import(ImportConfig(format="palette", output_dir=str(out), palette=str(semantic / "palette.json"),
                            train_images=str(semantic / "train/images"),
                            train_labels=str(semantic / "train/colored_masks")), log=quiet)
    assert read_class_names(out) == CLASSES
    for source in sorted((tiles / "masks").iterdir()):
        assert np.array_equal(read_png(out / "train" / "masks" / source.name), read_png(source))


@needs_real_data
def test_palette_import_of_a_generated_paletted_and_rgb_dataset(tiles, tmp_path):
    """Colour masks made here with our own colours: half as paletted PNGs, half as RGB, two colours for class 5."""
    colours = [(0, 0, 0), (200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 0), (0, 200, 200)]
    images, labels = tmp_path / "src" / "images", tmp_path / "src" / "labels"
    labels.mkdir(parents=True)
    images.mkdir()
    sources = sorted((tiles / "masks").iterdir())
    for i, source in enumerate(sources):
        mask = read_png(source)
        (images / f"{source.stem}.jpg").symlink_to((tiles / "images" / f"{source.stem}.jpg").resolve())
        if i % 2:
            paletted = Image.fromarray(mask.astype(np.uint8), mode="P")
            paletted.putpalette([v for c in colours for v in c])
            paletted.save(labels / f"{source.stem}.png")
        else:
            rgb = np.array(colours, dtype=np.uint8)[mask]
            rgb[(mask == 5) & (np.indices(mask.shape)[0] % 2 == 0)] = (0, 180, 180)  # a second shade of class 5
            Image.fromarray(rgb).save(labels / f"{source.stem}.png")
    palette = {"#%02x%02x%02x" % c: name for c, name in zip(colours, CLASSES)} | {"0,180,180": "uneven"}
    palette_path = write_config(tmp_path / "palette.json", palette)
    out = tmp_path / "dataset"
    run_import(ImportConfig(format="palette", output_dir=str(out), palette=str(palette_path),
                            train_images=str(images), train_labels=str(labels)), log=quiet)
    assert read_class_names(out) == CLASSES
    for source in sources:
        assert np.array_equal(read_png(out / "train" / "masks" / source.name), read_png(source))


# --------------------------------------------------------------------------------------------------------------
# Small label files: rules and errors
# --------------------------------------------------------------------------------------------------------------


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (12, 10)) -> None:
    """Grey RGB images of size (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((size[1], size[0], 3), 90, dtype=np.uint8)).save(folder / name)


def square(x: int, y: int, side: int) -> list[float]:
    return [x, y, x + side, y, x + side, y + side, x, y + side]


def overlapping_coco(tmp_path: Path) -> tuple[Path, Path]:
    """One 12x10 image: a small 'spot' (category 7) listed first, then a large 'stain' (category 3) over it,
    and an uncompressed-RLE 'spot' in the corner."""
    write_images(tmp_path / "images", ["a.png"])
    corner = np.zeros((10, 12), dtype=np.uint8)
    corner[8:10, 0:2] = 1
    runs = uncompressed_rle(corner)
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects({"size": [10, 12], "counts": runs}, 10, 12)),
                          corner)
    data = {"images": [{"id": 5, "file_name": "a.png", "width": 12, "height": 10}],
            "categories": [{"id": 7, "name": "spot"}, {"id": 3, "name": "stain"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 7, "segmentation": [square(2, 2, 2)], "iscrowd": 0},
                {"id": 2, "image_id": 5, "category_id": 3, "segmentation": [square(1, 1, 6)], "iscrowd": 0},
                {"id": 3, "image_id": 5, "category_id": 7, "segmentation": {"size": [10, 12], "counts": runs},
                 "iscrowd": 1}]}
    return write_config(tmp_path / "coco.json", data), tmp_path / "images"


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0] + runs


@pytest.mark.parametrize("overlap, expected_centre", [("smaller-wins", "spot"), ("later-wins", "stain")])
def test_coco_overlaps_are_settled_by_the_overlap_rule(tmp_path, overlap, expected_centre):
    labels, images = overlapping_coco(tmp_path)
    out = tmp_path / "dataset"
    run_import(ImportConfig(format="coco", output_dir=str(out), train_images=str(images),
                            train_labels=str(labels), overlap=overlap), log=quiet)
    names = read_class_names(out)
    assert names == ["background", "stain", "spot"]  # categories sorted by id: 3 -> class 1, 7 -> class 2
    mask = read_png(out / "train" / "masks" / "a.png")
    assert names[mask[2, 2]] == expected_centre  # inside both squares
    assert names[mask[6, 6]] == "stain" and names[mask[9, 0]] == "spot" and mask[0, 11] == 0


def test_coco_annotation_with_an_unknown_category_is_refused_with_its_id(tmp_path):
    labels, images = overlapping_coco(tmp_path)
    data = json.loads(labels.read_text())
    data["annotations"][1]["category_id"] = 42
    labels.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"coco.json: 1 annotations have unknown category ids 42 \(first: "
                                           r"annotation 2 of image 5\); the categories have ids 3, 7"):
        run_import(ImportConfig(format="coco", output_dir=str(tmp_path / "out"), train_images=str(images),
                                train_labels=str(labels)), log=quiet)
    assert not (tmp_path / "out").exists()


def test_coco_annotations_for_missing_images_are_refused(tmp_path):
    labels, images = overlapping_coco(tmp_path)
    data = json.loads(labels.read_text())
    data["annotations"][0]["image_id"] = 99
    labels.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotations refer to images missing from 'images' \(first: "
                                           r"annotation 1 -> image_id 99\)"):
        run_import(ImportConfig(format="coco", output_dir=str(tmp_path / "out"), train_images=str(images),
                                train_labels=str(labels)), log=quiet)
    (images / "a.png").unlink()
    data["annotations"][0]["image_id"] = 5
    labels.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"1 images listed there are not in .*images \(a.png \(3 annotations\)\)"):
        run_import(ImportConfig(format="coco", output_dir=str(tmp_path / "out"), train_images=str(images),
                                train_labels=str(labels)), log=quiet)


def test_a_colour_missing_from_the_palette_is_named_with_both_files(tmp_path):
    write_images(tmp_path / "images", ["a.png", "b.png"])
    (tmp_path / "labels").mkdir()
    for name, odd in (("a.png", False), ("b.png", True)):
        rgb = np.zeros((10, 12, 3), dtype=np.uint8)
        rgb[2:5, 2:5] = (255, 0, 0)
        if odd:
            rgb[7, 7] = (10, 11, 12)
        Image.fromarray(rgb).save(tmp_path / "labels" / name)
    palette = write_config(tmp_path / "palette.json", {"#000000": "background", "#ff0000": "crack"})
    with pytest.raises(DatasetError, match=r"labels/b.png: colours #0a0b0c \(1 px\) are not in the palette "
                                           r".*palette.json; add them to the palette file"):
        run_import(ImportConfig(format="palette", output_dir=str(tmp_path / "out"), palette=str(palette),
                                train_images=str(tmp_path / "images"), train_labels=str(tmp_path / "labels")),
                   log=quiet)
    assert not (tmp_path / "out").exists()  # every mask is checked before anything is written


def cityscapes_like(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """Images `<city>/<name>_leftImg8bit.png` and id maps `<city>/<name>_gtFine_labelIds.png` (ids 0, 7, 8, 26),
    plus a `_color.png` the suffix must skip."""
    ids = np.zeros((10, 12), dtype=np.uint8)
    ids[0:5] = 7
    ids[5:8] = 8
    ids[8:, 6:] = 26
    for city, frame in (("aachen", "aachen_000000"), ("bonn", "bonn_000001")):
        write_images(tmp_path / "leftImg8bit" / city, [f"{frame}_leftImg8bit.png"])
        labels = tmp_path / "gtFine" / city
        labels.mkdir(parents=True)
        Image.fromarray(ids).save(labels / f"{frame}_gtFine_labelIds.png")
        Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(labels / f"{frame}_gtFine_color.png")
    return tmp_path / "leftImg8bit", tmp_path / "gtFine", ids


@pytest.mark.parametrize("ignore_label", [0, 255])
def test_id_maps_are_mapped_to_train_ids_and_ignored_ids_become_the_ignore_label(tmp_path, ignore_label):
    images, labels, ids = cityscapes_like(tmp_path)
    mapping = write_config(tmp_path / "mapping.json", {"mapping": {"7": 1, "8": 2, "26": 3, "0": "ignore"},
                                                       "classes": ["void", "road", "sidewalk", "car"]})
    out = tmp_path / "dataset"
    summary = run_import(ImportConfig(format="id-map", output_dir=str(out), id_mapping=str(mapping),
                                      train_images=str(images), train_labels=str(labels),
                                      image_suffix="_leftImg8bit", label_suffix="_gtFine_labelIds",
                                      ignore_label=ignore_label), log=quiet)
    assert summary["images"] == {"train": 2}
    mask = read_png(out / "train" / "masks" / "bonn_000001.png")
    expected = np.select([ids == 7, ids == 8, ids == 26], [1, 2, 3], default=ignore_label)
    assert np.array_equal(mask, expected)
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == ["aachen_000000.png", "bonn_000001.png"]
    assert read_class_names(out) == ["void", "road", "sidewalk", "car"]


def test_an_id_missing_from_the_mapping_is_named_with_both_files(tmp_path):
    images, labels, _ = cityscapes_like(tmp_path)
    mapping = write_config(tmp_path / "mapping.json", {"mapping": {"7": 1, "8": 2, "0": 0}})
    with pytest.raises(DatasetError, match=r"aachen_000000_gtFine_labelIds.png: label ids 26 are not in the mapping "
                                           r".*mapping.json"):
        run_import(ImportConfig(format="id-map", output_dir=str(tmp_path / "out"), id_mapping=str(mapping),
                                train_images=str(images), train_labels=str(labels),
                                image_suffix="_leftImg8bit", label_suffix="_gtFine_labelIds"), log=quiet)


def test_images_and_labels_that_do_not_pair_are_listed(tmp_path):
    images, labels, _ = cityscapes_like(tmp_path)
    mapping = write_config(tmp_path / "mapping.json", {"mapping": {"7": 1}, "default": 0})
    with pytest.raises(DatasetError, match=r"2 images in .* without a label file \(aachen_000000_leftImg8bit, "
                                           r"bonn_000001_leftImg8bit\).*set image_suffix / label_suffix"):
        run_import(ImportConfig(format="id-map", output_dir=str(tmp_path / "out"), id_mapping=str(mapping),
                                train_images=str(images), train_labels=str(labels)), log=quiet)


def test_import_never_writes_into_a_folder_that_is_not_empty(tmp_path):
    labels, images = overlapping_coco(tmp_path)
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"key 'output_dir': .*dataset is not an empty folder"):
        run_import(ImportConfig(format="coco", output_dir=str(out), train_images=str(images),
                                train_labels=str(labels)), log=quiet)
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_import_config_names_the_missing_key():
    with pytest.raises(ConfigError, match="key 'format' must be one of coco, palette, id-map"):
        config_from_dict("import", {"output_dir": "x", "train_images": "i", "train_labels": "l"})
    with pytest.raises(ConfigError, match="key 'palette' is required for format palette"):
        config_from_dict("import", {"format": "palette", "output_dir": "x", "train_images": "i", "train_labels": "l"})
    with pytest.raises(ConfigError, match="key 'test_labels' is required when test_images is given"):
        config_from_dict("import", {"format": "coco", "output_dir": "x", "train_images": "i", "train_labels": "l",
                                    "test_images": "t"})


def test_main_import_runs_and_a_missing_labels_file_is_one_line_with_status_2(tmp_path, capsys):
    labels, images = overlapping_coco(tmp_path)
    values = {"format": "coco", "output_dir": str(tmp_path / "dataset"), "train_images": str(images),
              "train_labels": str(labels)}
    assert main.main(["import", "-c", str(write_config(tmp_path / "import.json", values))]) == 0
    assert (tmp_path / "dataset" / "classes.json").is_file()
    capsys.readouterr()
    values |= {"output_dir": str(tmp_path / "other"), "train_labels": str(tmp_path / "nowhere.json")}
    assert main.main(["import", "-c", str(write_config(tmp_path / "import.json", values))]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "key 'train_labels': file" in error and "\n" not in error


# --------------------------------------------------------------------------------------------------------------
# classes.json
# --------------------------------------------------------------------------------------------------------------


@needs_real_data
def test_class_names_come_from_classes_json_and_must_match_num_classes():
    assert read_class_names(MAGNETIC_TILE, 6) == CLASSES
    with pytest.raises(DatasetError, match=r"classes.json: lists 6 class names but num_classes is 4"):
        read_class_names(MAGNETIC_TILE, 4)


def test_without_classes_json_the_classes_are_numbered(tmp_path):
    assert read_class_names(tmp_path, 3) == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("content, message", [
    ("{not json", r"classes.json: not valid JSON \(line 1"),
    ('["background", "crack"]', r'classes.json: expected a JSON object with a "classes" list'),
    ('{"classes": ["background", ""]}', r'classes.json: expected a JSON object with a "classes" list'),
    ('{"classes": ["background", "crack", "crack"]}', r"class names \['crack'\] appear more than once"),
])
def test_a_malformed_classes_json_is_one_line_naming_the_file(tmp_path, content, message):
    (tmp_path / "classes.json").write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        read_class_names(tmp_path)
    assert "\n" not in str(error.value)
