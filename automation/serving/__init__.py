"""The local endpoint: an HTTP server for one chat model, and the code that starts and stops it.

`contract` holds the request and reply models and `score_request` (the reference's scoring
request, built in one place); `server` is the FastAPI app, `openapi` its published document,
`generator` the continuous-batching engine (imports torch lazily, in its worker) and `sampling`
its per-request sampler; `process` starts servers detached, records them in the workspace and
stops them. Importing this package imports neither torch nor transformers.
"""
