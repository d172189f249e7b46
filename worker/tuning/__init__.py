"""Fine-tuning each domain's code-embedding table off the consumer thread: read a
checkpoint, train, gate against the current version, publish or record the rejection;
and the scheduler that decides when. Knows nothing of serving."""
