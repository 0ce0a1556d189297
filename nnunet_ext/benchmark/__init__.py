"""Running stock nnU-Net beside our trainers on the same data, split and budget."""
