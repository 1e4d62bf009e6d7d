"""(c) A pandas batch: build a frame of orders, group it by customer and
region, aggregate, merge the result back, several times."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROWS = harness.scaled(400_000)
BATCHES = 4


def batch():
    rng = np.random.default_rng(7)
    total = 0.0
    for _ in range(BATCHES):
        frame = pd.DataFrame({
            "customer": rng.integers(0, 5_000, ROWS),
            "region": pd.Categorical(rng.choice(["eu", "us", "apac", "latam"], ROWS)),
            "amount": rng.random(ROWS) * 100.0,
            "sku": ["sku-%d" % (i % 997) for i in range(ROWS)],
        })
        summary = frame.groupby(["customer", "region"], observed=True).agg(
            amount_sum=("amount", "sum"), amount_mean=("amount", "mean"), skus=("sku", "nunique"))
        joined = frame.merge(summary.reset_index(), on=["customer", "region"])
        total += float(joined["amount_sum"].sum())
    return {"rows": ROWS * BATCHES, "checksum": total}


if __name__ == "__main__":
    harness.run(batch)
