"""The local endpoint: an HTTP server for one chat model, and the code that starts and stops it.

`server` is the FastAPI app and its batching generator (imports torch lazily, in its worker);
`process` starts servers detached, records them in the workspace and stops them. Importing this
package imports neither torch nor transformers.
"""
