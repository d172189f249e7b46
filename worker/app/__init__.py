"""The daemon (``adacode run``): builds the store, the consumer loop, the fine-tune
scheduler, serving and the HTTP server, wires them through their constructors, answers
/healthz, /readyz and /metrics, and stops them in order."""
