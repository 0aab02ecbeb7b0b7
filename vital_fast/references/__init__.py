"""Reference sets: images, prototypes, top-k mining, relevance, the on-disk cache."""
