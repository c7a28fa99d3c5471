"""The embedded digits benchmark: tiny trained networks (a denoiser, an off-the-shelf classifier,
an evaluation network) on scikit-learn's bundled 8x8 digits, the script that trains them, and
the loaders of the shipped weights. A miniature of the paper's ImageNet setting that runs on a
CPU in minutes."""
