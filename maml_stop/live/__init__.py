"""The adapted predictor in use: few-shot adaptation to a new family (``maml-stop adapt``) and live
stopping inside ``model.generate()`` (``stopping``)."""
