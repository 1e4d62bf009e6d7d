"""gunicorn settings for gunicorn_app.py: four sync workers; the first two
forked cache every request."""
import os

workers = 4
worker_class = "sync"


def post_fork(server, worker):
    # Runs in the worker before it imports the app.
    os.environ["PYMEM_LEAKY"] = "1" if worker.age <= 2 else "0"
