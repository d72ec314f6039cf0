"""Token bucket for the migration bandwidth limit (QEMU's max-bandwidth / max_bandwidth_mib_s).

Pure: the caller hands in the time and sleeps the delay this module answers. It owns only the
arithmetic; it never sleeps, reads a clock or sees page contents.
"""

from __future__ import annotations

# Burst allowance: 100 ms worth of the rate (QEMU's rate limiter works in BUFFER_DELAY = 100 ms slices).
BURST_S = 0.1


class TokenBucket:
    """`rate` bytes per second (0 = unlimited), bucket depth `rate * burst_s` bytes.

    `reserve(nbytes, now)` takes `nbytes` (the bucket may go into debt so a batch larger than the
    burst is still allowed) and returns the seconds to wait before sending them so that the long-run
    rate never exceeds `rate`.
    """

    def __init__(self, rate: float, *, burst_s: float = BURST_S, now: float = 0.0):
        if rate < 0:
            raise ValueError("rate must not be negative")
        self.rate = float(rate)
        self.burst_s = burst_s
        self.capacity = self.rate * burst_s
        self.tokens = self.capacity
        self.last = now

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate (a config reload) without forgetting who is waiting: the debt carries over."""
        if rate < 0:
            raise ValueError("rate must not be negative")
        if rate == self.rate:
            return
        if self.rate and now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.rate = float(rate)
        self.capacity = self.rate * self.burst_s
        self.tokens = min(self.tokens, self.capacity) if self.rate else 0.0

    def reserve(self, nbytes: int, now: float) -> float:
        if not self.rate:
            return 0.0
        if now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class SharedLimit:
    """One migration's view of its own cap plus the host-wide bucket all outgoing migrations share.

    Fair share without a scheduler: every migration reserves its batches in the same host bucket, so
    the debt they wait out is served in the order it was taken (a virtual-time queue). With equal
    batches, concurrent migrations alternate and each gets 1/n of the host rate; one held back by a
    lower own cap takes less and leaves the rest to the others (work-conserving, max-min fair).
    `reserve` answers the longer of the two waits.
    """

    def __init__(self, own: TokenBucket, shared: TokenBucket | None = None):
        self.own = own
        self.shared = shared

    def reserve(self, nbytes: int, now: float) -> float:
        delay = self.own.reserve(nbytes, now)
        if self.shared is not None:
            delay = max(delay, self.shared.reserve(nbytes, now))
        return delay
