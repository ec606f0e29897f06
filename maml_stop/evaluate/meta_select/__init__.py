"""The meta-selection study (issue 25): nested simulation (:mod:`.simulate`), the fold loop
(:mod:`.study`) and its figures (:mod:`.summary`); the selectors themselves are runtime code in
:mod:`maml_stop.decide.meta`."""
