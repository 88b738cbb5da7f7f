"""A real one-node SLURM (Debian's slurm-wlm packages) on this machine, for the SLURM end-to-end test.

`LocalSlurm.start()` installs the packages if they are missing (apt-get, root only), writes
/etc/slurm/slurm.conf and gres.conf (the default path is required: the executor plugin's job step drops
SLURM_* variables such as SLURM_CONF before its inner srun), creates fake GPUs as character devices
(/dev/fakegpu0..1; SLURM rejects plain files), starts munged (if no munge daemon answers), slurmctld and
slurmd, and waits for the node to be idle. `stop()` kills the daemons it started by their pid files and
restores whatever /etc/slurm files were there before. Anything that cannot be done raises `Unavailable`
with the reason, which the fixture turns into a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
ETC = Path("/etc/slurm")
MUNGE_KEY = Path("/etc/munge/munge.key")
N_FAKE_GPUS = 2


class Unavailable(RuntimeError):
    """SLURM cannot be set up here; the message says why."""


def _run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_packages(log) -> float:
    """Install the Debian packages when a daemon is missing; returns seconds spent installing."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return 0.0
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    t0 = time.time()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    p = _run(["apt-get", "install", "-y", "-q", *PACKAGES], timeout=900, env=env)
    if p.returncode != 0:  # a stale package index: refresh once
        _run(["apt-get", "update", "-q"], timeout=600, env=env)
        p = _run(["apt-get", "install", "-y", "-q", *PACKAGES], timeout=900, env=env)
    if p.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {p.stderr[-500:]}")
    log(f"installed {PACKAGES} in {time.time() - t0:.0f} s")
    return time.time() - t0


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024


HOSTS = Path("/etc/hosts")
BRIDGE, SUBNET = "r1flowbr0", "10.77.0"


def _must(cmd, what):
    p = _run(cmd, timeout=30)
    if p.returncode != 0:
        raise Unavailable(f"{what}: {' '.join(cmd)}: {p.stderr.strip()[-300:]}")


class LocalSlurm:
    """`nodes=0`: the machine itself is the one node. `nodes=N`: N nodes r1n1..r1nN, each slurmd in its own
    network and host-name namespaces (`ip netns`, `unshare --uts`) with its own address on a bridge
    (SUBNET.11, .12, ...; the controller at SUBNET.1), named in /etc/hosts while the cluster runs: two
    hosts as far as SLURM, srun and torch.distributed can tell, on one machine."""

    def __init__(self, workdir: str | os.PathLike, partitions=("cpu", "gpu"), log=print, nodes: int = 0):
        self.dir = Path(workdir)
        self.host = socket.gethostname().split(".")[0]
        self.node_names = [f"r1n{i + 1}" for i in range(nodes)]
        self.netns: list[str] = []
        self.bridge = False
        self.hosts_before: str | None = None
        self.partitions = partitions
        self.log = log
        self.cpus = os.cpu_count() or 1
        self.real_memory = min(8000, _mem_mb() - 1024)
        self.backups: dict[Path, Path | None] = {}
        self.pidfiles: list[Path] = []
        self.made_devices: list[Path] = []
        self.install_seconds = 0.0

    # -- set-up ----------------------------------------------------------------------------------
    def start(self) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise Unavailable("needs root (daemons, /etc/slurm, /dev/fakegpu*)")
        self.install_seconds = ensure_packages(self.log)
        if _run(["scontrol", "ping"], timeout=10).stdout.count("UP"):
            raise Unavailable("a SLURM controller is already running here; not replacing its configuration")
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(exist_ok=True)
        try:
            if self.node_names:
                self._network()
            else:
                self._fake_gpus()
            self._write_config()
            self._munge()
            self._daemon(["slurmctld"], self.dir / "slurmctld.pid")
            if self.node_names:
                for name in self.node_names:  # slurmd in the node's namespaces, under the node's host name
                    (self.dir / f"spool-{name}").mkdir(exist_ok=True)
                    # nsenter, not `ip netns exec`: that mounts a sysfs of its own, without /sys/fs/cgroup
                    self._daemon(["nsenter", f"--net=/run/netns/{name}", "unshare", "--uts", "sh", "-c",
                                  f"hostname {name} && exec slurmd"], self.dir / f"slurmd-{name}.pid")
            else:
                self._daemon(["slurmd"], self.dir / "slurmd.pid")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self):
        if not all(shutil.which(b) for b in ("ip", "unshare", "nsenter")):
            raise Unavailable("several nodes need `ip` (iproute2), `unshare` and `nsenter` (util-linux)")
        _must(["ip", "link", "add", BRIDGE, "type", "bridge"], "cannot create a bridge")
        self.bridge = True
        _must(["ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE], "bridge address")
        _must(["ip", "link", "set", BRIDGE, "up"], "bridge up")
        for i, name in enumerate(self.node_names):
            _must(["ip", "netns", "add", name], "cannot create a network namespace")
            self.netns.append(name)
            veth = f"r1fv{i + 1}"
            _must(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name], "veth pair")
            _must(["ip", "link", "set", veth, "master", BRIDGE, "up"], "veth on the bridge")
            for cmd in (["ip", "addr", "add", f"{SUBNET}.{11 + i}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "lo", "up"]):
                _must(["ip", "netns", "exec", name, *cmd], f"network of {name}")
        # written in place, not replaced: /etc/hosts is often a bind mount (containers)
        self.hosts_before = HOSTS.read_text() if HOSTS.exists() else ""
        HOSTS.write_text(self.hosts_before.rstrip("\n") + "\n# r1flow test cluster (tests/helpers/slurm_cluster.py)\n"
                         + "".join(f"{SUBNET}.{11 + i} {n}\n" for i, n in enumerate(self.node_names)))

    def _fake_gpus(self):
        for i in range(N_FAKE_GPUS):
            dev = Path(f"/dev/fakegpu{i}")
            if dev.exists():
                if not dev.is_char_device():
                    raise Unavailable(f"{dev} exists and is not a character device")
                continue
            try:
                os.mknod(dev, 0o666 | 0o020000, os.makedev(195, i))  # S_IFCHR; 195 = the NVIDIA major
            except OSError as e:
                raise Unavailable(f"cannot create fake GPU device {dev}: {e}") from None
            self.made_devices.append(dev)

    def _install(self, path: Path, text: str):
        if path not in self.backups:
            if path.exists():
                bak = path.with_name(path.name + ".r1flow-test-backup")
                shutil.copy2(path, bak)
                self.backups[path] = bak
            else:
                self.backups[path] = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def _write_config(self):
        d, h = self.dir, self.host
        nodes = ",".join(self.node_names) or h
        parts = "\n".join(
            f"PartitionName={p} Nodes={nodes} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP"
            for i, p in enumerate(self.partitions))
        if self.node_names:
            ctl = f"{h}({SUBNET}.1)"
            node_lines = "".join(f"NodeName={n} NodeAddr={SUBNET}.{11 + i} CPUs={self.cpus} "
                                 f"RealMemory={self.real_memory} State=UNKNOWN\n" for i, n in enumerate(self.node_names))
            gres, spool, pid, dlog = "", f"{d}/spool-%n", f"{d}/slurmd-%n.pid", f"{d}/slurmd-%n.log"
        else:
            ctl = h
            node_lines = (f"NodeName={h} CPUs={self.cpus} RealMemory={self.real_memory} Gres=gpu:{N_FAKE_GPUS} "
                          "State=UNKNOWN\n")
            gres, spool, pid, dlog = "GresTypes=gpu\n", f"{d}/spool", f"{d}/slurmd.pid", f"{d}/slurmd.log"
        conf = f"""# written by r1flow's SLURM test (tests/helpers/slurm_cluster.py); restored when the test ends
ClusterName=r1flowtest
SlurmctldHost={ctl}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
SchedulerType=sched/backfill
StateSaveLocation={d}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={pid}
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={dlog}
{gres}{node_lines}{parts}
"""
        self._install(ETC / "slurm.conf", conf)
        if not self.node_names:
            self._install(ETC / "gres.conf", f"Name=gpu File=/dev/fakegpu[0-{N_FAKE_GPUS - 1}]\n")

    def _munge(self):
        if _run("munge -n | unmunge", shell=True, timeout=10).returncode == 0:
            return  # a munge daemon already answers
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        pid = self.dir / "munged.pid"
        p = _run(["munged", "--force", f"--pid-file={pid}"], timeout=30)
        if p.returncode != 0:
            raise Unavailable(f"munged did not start: {p.stderr.strip()}")
        self.pidfiles.append(pid)
        if _run("munge -n | unmunge", shell=True, timeout=10).returncode != 0:
            raise Unavailable("munge does not authenticate after starting munged")

    def _daemon(self, cmd, pidfile: Path):
        p = _run(cmd, timeout=60)  # both daemonise and write their PidFile
        self.pidfiles.append(pidfile)
        if p.returncode != 0:
            raise Unavailable(f"{cmd[0]} did not start: {p.stderr.strip()[-500:]}")

    def _wait_idle(self, timeout=60):
        t0 = time.time()
        deadline = t0 + timeout
        state = ""
        while time.time() < deadline:
            for pidfile in self.pidfiles:
                try:
                    os.kill(int(pidfile.read_text().split()[0]), 0)
                except (OSError, ValueError, IndexError):
                    if time.time() - t0 > 5:  # daemons write their pid file just after forking
                        deadline = 0  # a daemon died: its log says why
            state = _run(["sinfo", "-h", "-N", "-o", "%T"], timeout=10).stdout.strip()
            if state and all(s.startswith("idle") for s in state.split()):
                return
            time.sleep(1)
        names = ["slurmctld.log", "slurmd.log", *(f"slurmd-{n}.log" for n in self.node_names)]
        logs = "".join((self.dir / f).read_text()[-1500:] for f in names if (self.dir / f).exists())
        raise Unavailable(f"node not idle (or a daemon died) within {timeout} s (state {state!r}); logs:\n{logs}")

    # -- tear-down ---------------------------------------------------------------------------------
    def stop(self):
        # slurmd before slurmctld before munged: the reverse of the start order
        for pidfile in reversed(self.pidfiles):
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(150):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:  # slurmd retrying a registration can ignore SIGTERM for a while
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.pidfiles.clear()
        for path, bak in self.backups.items():
            if bak is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(bak, path)
        self.backups.clear()
        for dev in self.made_devices:
            dev.unlink(missing_ok=True)
        self.made_devices.clear()
        if self.hosts_before is not None:
            HOSTS.write_text(self.hosts_before)
            self.hosts_before = None
        for name in self.netns:  # its end of the veth pair goes with it, and so the pair
            _run(["ip", "netns", "del", name], timeout=30)
        self.netns.clear()
        if self.bridge:
            _run(["ip", "link", "del", BRIDGE], timeout=30)
            self.bridge = False
