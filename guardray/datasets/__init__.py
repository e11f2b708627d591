"""Dataset sources, the source registry and the dataset stage."""
