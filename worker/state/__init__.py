"""The worker's state as stored: the one home of every column family's key layout
(:mod:`worker.state.layout`) and of the reads every wing shares (:mod:`worker.state.reads`),
per-domain table versions (:mod:`worker.state.versions`) and per-user recent items
(:mod:`worker.state.users`). Knows nothing of Kafka, training loops or HTTP."""
