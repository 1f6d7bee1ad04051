"""A Flower app that trains the numpy mixture of experts with alignment-solver's AlignedStrategy."""
