"""Measured speed of drkeras (issue 8): ``python -m benchmarks --out runs/bench`` (``make bench``).

Sections (each also runnable alone, ``python -m benchmarks.<module>``):

1. :mod:`benchmarks.pipeline`: records -> augmented 512 x 512 batches with ``tf.data`` against
   a plain OpenCV/NumPy loop over the same files;
2. :mod:`benchmarks.train_steps`: train-step images/s and FLOP utilisation of each model;
3. the same module: MTUnet against ``segmentation_models.Unet("vgg16")``;
4. :mod:`benchmarks.inference`: latency of the exported SavedModel, preprocessing included;
5. :mod:`benchmarks.conversion`: ``data_prep`` images/s with 1 and 2 workers, peak memory at
   50 vs 500 images;
6. :mod:`benchmarks.train_steps`: train-step time against the input size.

Every figure is a ratio of two measurements made in the same run (there is no GPU here);
results go to ``<out>/bench.json`` and ``<out>/bench.md``, and the markdown is printed.
"""
