"""``maml-stop serve``: live stopping as a long-running service that keeps itself tuned (issue 27).

One idea per module: :mod:`.config` (nested settings), :mod:`.store` (SQLite in WAL mode: requests,
decisions, feedback, online states), :mod:`.loop` (arms, plans, feedback runs, the A/B test, the replay
that rebuilds them on restart), :mod:`.batching` (the model thread: dynamic batches into one
``generate()`` with live stopping), :mod:`.service` (start-up and its checks), :mod:`.app` (the HTTP
routes), :mod:`.metrics` (Prometheus text), :mod:`.dashboard` (the page), :mod:`.cli` (the command).
FastAPI and uvicorn come with the ``serve`` extra; the modules that need them import them themselves.
"""
