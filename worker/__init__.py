"""The adacode worker: one wing (subpackage) per job, imports running one way.

::

    commands   the ``adacode`` command line, the demo, operator actions, replay, inspection
       |
      app      the daemon: builds the parts below and wires them through their constructors
       |
    serving    per-domain indexes of the current version, the HTTP API, /metrics routes
       |
    tuning     fine-tunes (snapshot, train, gate, publish) and their scheduler
       |
    ingest     the consumer loop, batch processing, live codes, text encoder, group state
       |
     state     the one home of key layouts and shared reads; table versions; users
       |
     core      settings, logging, signals, memory, metrics, the worker error root

A module imports from its own wing or from a wing below it, never from one above
(``tests/test_architecture.py`` walks every import and fails on an upward one). The
packages ``quantize`` (pure arrays) and ``store`` (state partitions) sit below the whole
worker and never import it.
"""
