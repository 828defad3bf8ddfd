"""``saereg serve``: the feature browser over the catalog, served by uvicorn.

FastAPI, uvicorn and the app load when the command runs, never for ``saereg --help``.
"""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. Anything but the loopback interface needs --token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port).")
@click.option("--read-only", is_flag=True,
              help="Refuse every write: labels, presets and steering runs are not stored.")
@click.option("--token", default=None, envvar="SAEREG_TOKEN", metavar="T",
              help="Every write and model run must send `Authorization: Bearer T` "
                   "(required when binding beyond 127.0.0.1). Also read from SAEREG_TOKEN.")
def serve(host: str, port: int, read_only: bool, token: str | None) -> None:
    """Browse the catalog in a web browser: SAE versions, feature dashboards, label search,
    live prompts, steering and labelling, each page with a JSON twin under /api."""
    import logging
    import socket

    import uvicorn

    from saereg.analysis.web.app import create_app
    from saereg.registry.catalog import db
    from saereg.registry.errors import UsageError, redact

    app = create_app(host=host, token=token, read_only=read_only)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                         "choose another --port") from None
    sock.listen(128)
    port = sock.getsockname()[1]

    class Redacted(logging.Filter):  # the first page's URL carries ?token=T
        def filter(self, record: logging.LogRecord) -> bool:
            if record.args:
                record.args = tuple(redact(a, token) if isinstance(a, str) else a
                                    for a in record.args)
            return True

    config = uvicorn.Config(app, log_level="info", access_log=True, lifespan="off")
    server = uvicorn.Server(config)
    config.load()
    logging.getLogger("uvicorn.access").addFilter(Redacted())
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{port}/saes" + (f"?token={token}" if token else "")
    click.echo(f"catalog {db.safe_url(db.database_url())}"
               + ("  (read-only)" if read_only else ""))
    click.echo(f"saereg serve: open {url}")
    server.run(sockets=[sock])
