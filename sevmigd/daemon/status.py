"""Server status: what `server-info`, systemd's STATUS= line and the metrics read of a `Daemon`.

Split out of daemon/server.py by job (issue 17): `StatusMixin` (`server_info`, `resource_counts`,
`status_text`, the PSP store's figures). Read-only: it never changes a guest or a migration.
"""

from __future__ import annotations

import os
import time

import trio

from sevmigd import __version__, store
from sevmigd.daemon import control, systemd, tls, vmmhost

# The names of a guest's own tasks (daemon/guests.py starts them): its vCPU loop, or its VMM's watch.
GUEST_TASK_PREFIXES = ("vcpu:", "vmm:")


class StatusMixin:
    """The status side of `Daemon` (see the module docstring)."""

    def server_info(self) -> dict[str, object]:
        states: dict[str, int] = {}
        for g in self.guests.values():
            states[g.state] = states.get(g.state, 0) + 1
        fw_api = f"{self.fw.api_major}.{self.fw.api_minor}" if self.fw is not None else None
        return {
            "version": __version__,
            "pid": os.getpid(),
            "listen": self.listen_address,
            "listen_addresses": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.listen_addresses],
            "control": self.control_path,
            "state_dir": self.config.state_dir,
            "platform_id": self.platform_id,
            "api_version": fw_api,
            "guests": len(self.guests),
            "guest_states": states,
            "migrations": self.migrations.active(),
            "shutting_down": self.shutting_down,
            "uptime_s": None if self.started_at is None else round(time.monotonic() - self.started_at, 3),
            "tls": bool(self.config.tls.enabled),
            "log_level": self.config.log_level,
            "metrics": self.metrics.address,
            "outgoing_queue": len(self.migrations.queue),
            "psp_state": self._psp_state_info(),
            **self.resource_counts(),
            **(self.step_watch.figures() if self.step_watch is not None else {}),
        }

    def _psp_state_info(self) -> dict[str, object] | None:
        """The PSP's contexts (GUEST_STATUS of every live handle) and its store (RUNTIME/psp): what was
        restored at start, which files were damaged, failed saves. No key or context content."""
        if self.fw is None:
            return None
        contexts = []
        for h in self.fw.handles:
            st = self.fw.guest_status(h)
            contexts.append({"handle": h, "state": st.state.name, "asid": st.asid, "policy": f"{st.policy:#x}"})
        store, restored = self.psp_store, self.psp_restored
        return {
            "contexts": contexts,
            "dir": str(store.dir) if store is not None else None,
            "restored": list(restored.handles) if restored is not None else [],
            "damaged": [{"path": p, "error": e} for p, e in restored.damaged] if restored is not None else [],
            "save_errors": store.save_errors if store is not None else 0,
        }

    def resource_counts(self) -> dict[str, int | None]:
        """What a failed migration must not leave behind (issue 6, invariant 5): open file descriptors,
        live trio tasks, live PSP guest handles, bytes of guest RAM still mapped by registered guests."""
        try:
            fds: int | None = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = None
        tasks = guest_tasks = None
        try:
            # guest_tasks: those of a guest's own subtree (its vCPU task "vcpu:NAME", or its VMM's watch
            # "vmm:NAME" and what that runs), which come and go with the guest, not with a migration
            todo = [(trio.lowlevel.current_root_task(), False)]
            tasks = guest_tasks = 0
            while todo:
                t, in_guest = todo.pop()
                in_guest = in_guest or t.name.startswith(GUEST_TASK_PREFIXES)
                tasks += 1
                guest_tasks += in_guest
                for n in t.child_nurseries:
                    todo.extend((c, in_guest) for c in n.child_tasks)
        except RuntimeError:  # not inside trio
            pass
        ram = sum(g.vm.memory_bytes for g in self.guests.values() if not g.vm.released)
        return {"open_fds": fds, "tasks": tasks, "guest_tasks": guest_tasks,
                "psp_guests": self.fw.guest_count if self.fw is not None else None,
                "guest_ram_bytes": ram, "vmm_fds": vmmhost.held_fds(self.guests.values())}

    def status_text(self) -> str:
        """The one-line STATUS= systemd shows (`systemctl status`)."""
        return systemd.status_text([g.state for g in self.guests.values()],
                                   listening=self.listen_address or self.config.listen,
                                   shutting_down=self.shutting_down)


__all__ = ["StatusMixin"]
