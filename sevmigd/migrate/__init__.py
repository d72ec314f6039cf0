"""sevmigd.migrate: the pure parts of live migration (no I/O, no clock, no trio; see ARCHITECTURE.md).

* `planner`   PrecopyPlanner: QEMU's convergence rule, auto-converge, give-up; expected downtime.
* `ratelimit` TokenBucket for max_bandwidth_mib_s.
* `pages`     batching of pfns, split by the page-encryption bitmap, the Bitmap message codec.
* `stats`     MigrationStats with QEMU's query-migrate names.
* `trust`     the daemon's trust decision about a peer platform chain.
* `errors`    MigrationError(code, message) and firmware-error wording.

The I/O halves (channel, source and destination drivers, MigrationManager) live in sevmigd/daemon.
"""
