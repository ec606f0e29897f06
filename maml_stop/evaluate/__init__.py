"""The EM/token evaluation: stopping policies, thresholds, torchmetrics metrics, the leave-families-out
protocol (``maml-stop evaluate``), its report, the training-time callback and the corpus datasheet."""
