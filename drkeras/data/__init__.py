"""Data: the record schema, tf.data pipelines, preprocessing, augmentation and synthetic data."""
