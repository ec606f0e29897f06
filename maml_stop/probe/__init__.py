"""Probing a generation: where to force an answer (``schedule``), the forced-answer engine that runs the
probes on a copy of the KV cache (``engine``), the features of a probe point with their free/paid cost
classes (``features``) and how a trace's final answer is read (``labels``). The harvester and live
stopping both run this code."""
