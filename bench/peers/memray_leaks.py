"""Reads a memray capture file with memray's reader API and prints, as JSON,
what memray reports as leaked (allocated and never freed while tracked):
the total, and the heaviest stacks with their frames, innermost first."""
import json
import sys

from memray import FileReader

TOP = 10


def main():
    reader = FileReader(sys.argv[1])
    records = list(reader.get_leaked_allocation_records(merge_threads=True))
    records.sort(key=lambda r: r.size, reverse=True)
    out = {
        "leaked_bytes": sum(r.size for r in records),
        "top": [{
            "size": r.size,
            "count": r.n_allocations,
            "frames": [{"function": f[0], "file": f[1], "line": f[2]} for f in r.stack_trace()],
        } for r in records[:TOP]],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
