"""A Flask app served by gunicorn with four sync workers, two of which
cache every request forever (gunicorn_conf.py marks them with
PYMEM_LEAKY=1 as they fork). GET /item/N answers {"pid", "leaky",
"entries"}: which worker served it and how many entries its cache holds,
measured here.
"""
import os

from flask import Flask, jsonify

app = Flask(__name__)
LEAKY = os.environ.get("PYMEM_LEAKY") == "1"
CACHE = {}


def render(n):
    return {"item": n, "body": "x" * 20000 + str(n)}


@app.route("/item/<int:n>")
def item(n):
    page = render(n)
    if LEAKY:
        CACHE[n] = page  # SITE: cache
    return jsonify(pid=os.getpid(), leaky=LEAKY, entries=len(CACHE))
