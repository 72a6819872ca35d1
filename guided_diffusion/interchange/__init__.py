"""Datasets in and out: the import action (COCO, colour masks, id maps) and the export action (COCO, YOLO)."""
