"""A Flower app that trains a tiny Hugging Face Mixtral (transformers 5, fused experts) with alignment-solver."""
