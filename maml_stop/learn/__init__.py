"""Meta-learning the stopping predictor: the learn2learn import (``l2l``), the predictor (``predictor``),
the one inner-loop adapter (``adapter``), the LightningModule (``module``), LightningCLI (``cli``) and safe
checkpoint loading (``checkpoint_io``)."""
