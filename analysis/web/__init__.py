"""``saereg serve``: a local feature browser over the catalog (SAEs, versions, feature
dashboards, label search, live prompts, steering, labelling), as server-rendered pages with a
JSON twin of each under ``/api`` and an OpenAPI description at ``/openapi.json``.

Modules: :mod:`.app` (``create_app``: the ASGI app, error handling, docs page), :mod:`.api`
(JSON and Server-Sent-Event routes), :mod:`.pages` (HTML routes), :mod:`.views` (the data every
page and its JSON twin share, read through the library), :mod:`.warm` (models and SAEs kept
loaded, prompt activations), :mod:`.streams` (steering generations streamed from a worker
thread), :mod:`.security` (binding, token, read-only mode, request limits, headers).
Templates, CSS and JavaScript ship in ``templates/`` and ``static/``; nothing loads from
elsewhere at run time.
"""
