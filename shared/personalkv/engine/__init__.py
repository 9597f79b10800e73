"""The answering engine: what runs the model for many Asks at once.

  scheduler    admission, the loop that prefills and decodes every admitted request, failure
               containment (one request's fault fails that request alone), bounded waits
  batch        the decode batch: many requests' caches advanced by one batched forward
  detokenizer  incremental detokenization for streaming (each token decoded once)

It builds on ``personalkv.kv`` (chunks, placement, recompute, the per-request conversation
cache and the generation primitives) and is used by ``service_layer`` (the use cases).
"""
