"""(b) A Flask service: a JSON endpoint that renders a small order list,
served by werkzeug's threaded server on 127.0.0.1 (an ephemeral port). After
"go" it prints PEERS-LISTEN {"port": ...}, serves until the next line on
stdin ("stop"), and returns how many requests it answered; the harness's
load generator measures throughput and latency."""
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from flask import Flask, jsonify  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

app = Flask(__name__)
served = [0]


@app.route("/orders/<int:user>")
def orders(user):
    served[0] += 1
    items = [{"id": user * 100 + i, "sku": "sku-%d" % (i * 7 % 13), "qty": i % 5 + 1,
              "price": round(i * 1.25, 2)} for i in range(20)]
    return jsonify(user=user, items=items, total=sum(i["qty"] * i["price"] for i in items))


def serve():
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    harness.emit("LISTEN", {"port": server.server_port})
    sys.stdin.readline()
    server.shutdown()
    return {"requests": served[0]}


if __name__ == "__main__":
    harness.run(serve)
