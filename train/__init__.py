"""Retraining SRCSM models: datasets, preprocessing cache, SRC and baseline augmentations, trainer,
export of model packages, and cross-domain evaluation. Built on SRCSMSegmenterLib (one definition of
the network, the source profile, normalisation and geometry)."""
