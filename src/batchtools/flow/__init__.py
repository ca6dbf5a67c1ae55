"""Flow: dependency graphs, pipelines, priority queues, transactions and locks.

Each runs on the engine, so it gets the engine's policies, backends,
journal and report.
"""
