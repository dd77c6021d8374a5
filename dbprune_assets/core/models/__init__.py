"""Models, training and evaluation: encoders, embeddings, open_clip_train, CLIP_benchmark, the comparison."""
