"""(d) A numpy array pipeline: normalise, filter, convolve and reduce blocks
of a signal, allocating new arrays at every step."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402

BLOCKS = harness.scaled(60)
BLOCK = 500_000


def pipeline():
    rng = np.random.default_rng(3)
    kernel = np.hanning(31)
    kernel /= kernel.sum()
    checksum = 0.0
    for _ in range(BLOCKS):
        signal = rng.standard_normal(BLOCK)
        normalised = (signal - signal.mean()) / signal.std()
        clipped = np.clip(normalised, -3.0, 3.0)
        smooth = np.convolve(clipped, kernel, mode="same")
        peaks = smooth[smooth > 1.0]
        spectrum = np.abs(np.fft.rfft(smooth[:65536]))
        checksum += float(peaks.sum() + spectrum[:100].sum())
    return {"blocks": BLOCKS, "checksum": checksum}


if __name__ == "__main__":
    harness.run(pipeline)
