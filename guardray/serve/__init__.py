"""`guardray serve`: a trained probe in front of its chat model, scored in the prefill pass generation runs.

Modules: `artifact` (which probe, from a job output or an artifact directory), `engine` (the model, the probe
hook, the policy; no HTTP, no Ray), `api` (request/response models and the server settings), `loading` (a
replica's model, probe and guard), `app` (the Ray Serve deployment), `gate` (what a request passes before it is
parsed: bearer token, body size, bounded queue), `deploy` (embedded, cluster, Serve config).
"""
