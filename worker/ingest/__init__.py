"""From Kafka to state: the consumer loop (poll, process, dead-letter, commit), event
parsing, the batch processor, live code assignment, the frozen text encoder, broker
health and the state a group of workers shares on Kafka (versions and the codebook).
Knows nothing of fine-tuning or serving."""
