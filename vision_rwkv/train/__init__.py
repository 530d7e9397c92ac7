"""Training: data sources, training pairs and the feature cache, the trainer and its run folder, the
trainer state, the torchrun launch, and the COCO caption metrics."""
