"""The research harness: the leave-families-out protocol (``maml-stop evaluate``), its method registry,
folds, metrics and report, the training-time callback, the back-off calibration and the corpus datasheet.
What a deployment runs to decide lives below it, in :mod:`maml_stop.decide`."""
