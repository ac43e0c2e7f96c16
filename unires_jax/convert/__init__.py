"""Weight conversion between PyTorch (`transformers`, `timm`, open_clip) and our NNX modules."""
