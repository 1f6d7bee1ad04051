"""A Flower app that trains a PyTorch MoE (two MoE blocks, top-2 of 8 experts) with alignment-solver."""
