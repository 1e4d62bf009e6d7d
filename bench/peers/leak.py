"""(e) A real leak: a request handler that churns temporaries (most of the
allocations) and keeps one SessionRecord per request in the unbounded
module-level cache SESSIONS, at the line marked LEAK. The harness reads the
line number from the marker; the type and the variable are fixed:
SessionRecord and SESSIONS."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

REQUESTS = harness.scaled(300_000)
SESSIONS = {}


class SessionRecord:
    __slots__ = ("user", "score", "tags")

    def __init__(self, user, score, tags):
        self.user = user
        self.score = score
        self.tags = tags


def handle(i):
    parts = ["field-%d" % j for j in range(24)]
    body = {"request": i, "parts": parts, "text": "/".join(parts)}
    score = len(body["text"]) * 0.5 + i
    SESSIONS[i] = SessionRecord(i, score, (i, "user-%d" % i))  # LEAK
    return len(parts)


def serve():
    for i in range(REQUESTS):
        handle(i)
    kept = sum(
        sys.getsizeof(r) + sys.getsizeof(r.score) + sys.getsizeof(r.tags) + sys.getsizeof(r.tags[1])
        for r in SESSIONS.values()
    ) + sys.getsizeof(SESSIONS)
    return {"requests": REQUESTS, "kept_bytes": kept}


if __name__ == "__main__":
    harness.run(serve)
