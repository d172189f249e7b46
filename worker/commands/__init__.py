"""What people run: the ``adacode`` command line, the demo, operator actions (rollback,
fine-tune, export), read-only inspection, dataset replay, synthetic data and topic
creation. Sits on top: it may use every other wing."""
