"""Answering reads: per-domain faiss indexes of the current version with live cold-start
items, the HTTP server and the ``/v1`` routes with their OpenAPI document."""
