"""A Flower app whose ClientApp raises in every training round and has no query handler."""
