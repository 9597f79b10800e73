"""The answering engine: what runs the model for many Asks at once.

  scheduler    admission, the loop that plans each step and has the runner carry it out,
               failure containment (one request's fault fails that request alone), bounded waits
  policy       the plan of a step from numbers alone (who ends, joins, prefills, decodes)
  runner       the model work a plan asks for (the only module here that runs the model)
  job          ModelJob, the model's part of one Ask (what the scheduler and the runner share)
  memory       what a batch's KV costs in bytes, and the device budget
  batch        the decode batch: many requests' caches advanced by one batched forward
  detokenizer  incremental detokenization for streaming (each token decoded once)

It builds on ``personalkv.kv`` (chunks, placement, recompute, the per-request conversation
cache and the generation primitives) and is used by ``service_layer`` (the use cases).
"""
