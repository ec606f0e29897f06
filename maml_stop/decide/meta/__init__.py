"""Meta-learned selectors (issue 25): the threshold decision fitted across families' simulated episodes.

* :mod:`.outcomes`: the vectorised engine, every candidate threshold of every episode in one pass;
* :mod:`.features`: what a support sweep says, as numbers per candidate (the selectors' inputs);
* :mod:`.rules`: the empirical-Bayes and learned-map selectors;
* :mod:`.calibration`: the meta-calibrated margin;
The nested simulation that fits them is research harness: :mod:`maml_stop.evaluate.meta_select`.
"""
