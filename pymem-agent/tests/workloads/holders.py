"""A heap with known holders for pymem's holders tests (Python 3.8+).

Builds, then prints one JSON line of ground truth measured here, inside the
process (never by pymem), and waits on stdin (`grow N`: N more orders in
ORDERS; any other line: the same answer again, updated; `exit` or end of
input: exits):
  ORDERS  module global: a list of 200,000 Order instances, each with a
          unique int, str and float attribute
  TOKENS  module global: a dict of 100,000 small dicts
  batch   a local of `hold_batch`, which a thread sleeps in: a list of
          100,000 unique ints above 256
For ORDERS and TOKENS: len(), and the bytes tracemalloc traced as allocated
(and still kept) while each was built.
"""
import json
import os
import sys
import threading
import time
import tracemalloc


class Order:
    def __init__(self, i):
        self.order_id = 1_000_000 + i
        self.label = "order-%07d" % i
        self.price = i * 0.5 + 0.25


def build_orders(n):
    return [Order(i) for i in range(n)]


def build_tokens(n):
    return {"token-%07d" % i: {"user": 2_000_000 + i, "scope": "s%07d" % i} for i in range(n)}


def traced(build, n):
    """The structure `build` makes and the bytes it kept, as tracemalloc
    counts them."""
    before = tracemalloc.get_traced_memory()[0]
    made = build(n)
    after = tracemalloc.get_traced_memory()[0]
    return made, after - before


tracemalloc.start()
ORDERS, orders_bytes = traced(build_orders, 200_000)
TOKENS, tokens_bytes = traced(build_tokens, 100_000)
tracemalloc.stop()

batch_ready = threading.Event()
batch_info = {}


def hold_batch():
    batch = [3_000_000 + i for i in range(100_000)]
    batch_info["len"] = len(batch)
    batch_info["ident"] = threading.get_ident()
    batch_info["native_id"] = threading.get_native_id()
    batch_ready.set()
    while True:
        time.sleep(3600)


threading.Thread(target=hold_batch, name="holder", daemon=True).start()
batch_ready.wait()

truth = {
    "ready": True,
    "pid": os.getpid(),
    "version": "%d.%d.%d" % sys.version_info[:3],
    "orders": {"len": len(ORDERS), "traced_bytes": orders_bytes},
    "tokens": {"len": len(TOKENS), "traced_bytes": tokens_bytes},
    "batch": dict(batch_info),
}
print(json.dumps(truth), flush=True)
for line in sys.stdin:
    command = line.split()
    if command == ["exit"]:
        break
    if len(command) == 2 and command[0] == "grow":
        start = len(ORDERS)
        ORDERS.extend(Order(start + i) for i in range(int(command[1])))
        truth["orders"]["len"] = len(ORDERS)
    print(json.dumps(truth), flush=True)
