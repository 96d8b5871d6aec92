"""Import of externally trained weights (the authors' PyTorch checkpoints)."""
