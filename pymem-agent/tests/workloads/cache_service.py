"""The textbook leak, as a service: a Flask app whose /analyze handler keeps
each distinct request's pandas result in a module-level dict CACHE and
never evicts it. With --fixed, the usual fix: the same analysis behind
functools.lru_cache(maxsize=100), and no CACHE growth.

Usage: cache_service.py PORT [--fixed]. Prints one JSON line when it
listens. GET /stats answers how many entries CACHE (or the lru_cache)
holds, measured here.
"""
import functools
import json
import logging
import sys

import pandas as pd
from flask import Flask, jsonify, request

app = Flask(__name__)
logging.getLogger("werkzeug").setLevel(logging.ERROR)
FIXED = "--fixed" in sys.argv
CACHE = {}


def analyze_payload(payload):
    frame = pd.DataFrame(payload["rows"])
    frame["total"] = frame.sum(axis=1)
    return frame


@functools.lru_cache(maxsize=100)
def cached_analysis(key):
    return analyze_payload(json.loads(key))


@app.route("/analyze", methods=["POST"])
def analyze():
    payload = request.get_json()
    key = json.dumps(payload, sort_keys=True)
    if FIXED:
        result = cached_analysis(key)
    else:
        result = CACHE.get(key)
        if result is None:
            result = analyze_payload(payload)
            CACHE[key] = result
    return jsonify(rows=int(result.shape[0]))


@app.route("/stats")
def stats():
    entries = cached_analysis.cache_info().currsize if FIXED else len(CACHE)
    return jsonify(entries=entries)


if __name__ == "__main__":
    import os

    port = int(sys.argv[1])
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    # The caller reads one line: the server's banner goes nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    app.run(host="127.0.0.1", port=port, threaded=False)
