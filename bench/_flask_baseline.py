"""The baseline for the metadata-server benchmark: a bare Flask app answering the same bytes.

Served by ``gunicorn -k gthread -w 2 --threads 8 _flask_baseline:app`` (see bench/metadata_server.py).
"""

from flask import Flask, Response

app = Flask(__name__)


@app.get("/v1/maintenance_event")
def maintenance_event() -> Response:
    return Response(
        b"live_migrate",
        content_type="text/plain; charset=utf-8",
        headers={"ETag": '"1b3d1cb627a245d9ddad"', "Cache-Control": "no-store"},
    )
