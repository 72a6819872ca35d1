"""The segmenter: its settings, build, train with model selection, predict (smp); its metrics, ImageNet weights; and
the one segmenter run every part makes (train, choose, test, label alignment)."""
