"""The segmenter: build, train with model selection, predict (smp); its metrics, ImageNet weights, label alignment."""
