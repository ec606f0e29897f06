"""maml_stop: learn when a language model can stop generating, adapted to new domains with MAML."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1  # trace-corpus schema; bump when stored columns or their meaning change
