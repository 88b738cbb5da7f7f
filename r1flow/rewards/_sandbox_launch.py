"""Sandbox launcher: isolates itself, then runs the untrusted program. Standard library only.

Run as `python -I -S _sandbox_launch.py SPEC_JSON` by r1flow.rewards.sandbox, never imported. Steps:
1. new namespaces: network (no interfaces: no network at all), mount (private /tmp, /proc), PID (the
   program and everything it forks die with the namespace's init), and a user namespace when not root;
2. fork the namespace's init, which mounts a fresh /proc and tmpfs over the world-writable folders, binds
   the sandbox folder onto /tmp, and forks the program;
3. the program drops to the slot's own uid (root only), gets CPU, memory, file-size, process and file
   limits, a scrubbed environment, and is exec'd.
Exit status: the program's, or 128 + signal number; 125 when isolation itself failed.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
WORLD_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue")

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    _check(libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                      data and data.encode()), f"mount {target}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def main():
    spec = json.loads(sys.argv[1])
    work, uid, lim = spec["workdir"], spec["uid"], spec["limits"]
    root = os.geteuid() == 0
    isolated = spec.get("isolate", True)
    if isolated:
        outer_uid, outer_gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
        try:
            _check(libc.unshare(flags), "unshare")
        except OSError as e:
            print(f"sandbox: cannot create namespaces ({e})", file=sys.stderr)
            return 125
        if not root:  # map ourselves to root inside the user namespace, so that mounts are allowed
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {outer_uid} 1")
            _write("/proc/self/gid_map", f"0 {outer_gid} 1")

    init = os.fork()
    if init:  # the launcher: wait for the namespace's init and pass on its status
        _, status = os.waitpid(init, 0)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)

    # -- the namespace's init (pid 1 there) -----------------------------------------------------------
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if the launcher is killed, so is the whole namespace
    if isolated:
        try:
            _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks out to the host
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV)  # only this namespace's processes
            _mount(work, "/tmp", None, MS_BIND)  # the program's /tmp is its own folder
            for d in spec.get("tmpfs", WORLD_WRITABLE):  # sandbox.HIDDEN but /tmp
                if os.path.isdir(d) and not os.path.islink(d):
                    _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=700")
            work = "/tmp"
        except OSError as e:
            print(f"sandbox: {e}", file=sys.stderr)
            os._exit(125)
    prog = os.fork()
    if prog == 0:
        try:
            os.chdir(work)
            if isolated:  # its own session; unisolated runs stay in our process group so we can kill them
                os.setsid()
            mem = lim["memory_mb"] * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
            out = lim["max_output_bytes"]
            resource.setrlimit(resource.RLIMIT_FSIZE, (out, out))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if root and uid is not None:  # its own uid: cannot touch root's files, signal us or read /proc/*/environ
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            # per-uid process limit: applies once we are not root (root ignores RLIMIT_NPROC)
            resource.setrlimit(resource.RLIMIT_NPROC, (lim["max_processes"], lim["max_processes"]))
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
            os.execve(spec["argv"][0], spec["argv"], env)
        except BaseException as e:  # noqa: BLE001 - report anything, exit with the isolation code
            print(f"sandbox: cannot start the program ({e})", file=sys.stderr)
            os._exit(125)
    # init reaps everything until the program itself exits; when init exits, the kernel kills the rest
    while True:
        pid, status = os.wait()
        if pid == prog:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    sys.exit(main())
