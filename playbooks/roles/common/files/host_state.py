"""Digest of what a deploy manages on this host, and the stamp the last deploy left.

Run by role common (skip-unchanged.yml, record-deployed.yml) through `raw`, as root, with
the host's own Python (>= 3.9, standard library only). One argument, JSON:
  roots   paths hashed whole: every file's bytes, every link's target, and each entry's
          type, mode and owner (the stamp file itself excluded)
  shallow paths hashed without their contents (the agent writes in its state dir)
  user, group  the service account, as the system's databases have it
  units   systemd units: load, active and enablement state
  nft     an nftables table (family name), listed without counters; "" for none
  stamp   the stamp file
  record  when given: write "RECORD STATE" to the stamp (atomically, root 0600); exit 1
          with one line if it cannot
Prints one JSON line: {"stamp": what the stamp file held before, "state": sha256 hex}.
A host whose stamp is "INPUTS STATE" with the controller's inputs and the state printed now
is as the last deploy with those inputs left it.
"""
import grp
import hashlib
import json
import os
import pwd
import stat
import subprocess
import sys


def _entry(path, out, stamp):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        out.append((path, "missing"))
        return
    row = [path, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
    if stat.S_ISLNK(st.st_mode):
        row.append(os.readlink(path))
    elif stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 16), b""):
                digest.update(block)
        row.append(digest.hexdigest())
    out.append(tuple(row))


def _walk(root, out, stamp):
    _entry(root, out, stamp)
    if os.path.isdir(root) and not os.path.islink(root):
        for top, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(dirs + files):
                path = os.path.join(top, name)
                if path not in (stamp, stamp + ".tmp"):
                    _entry(path, out, stamp)


def _account(kind, name):
    try:
        if kind == "user":
            p = pwd.getpwnam(name)
            return (p.pw_uid, p.pw_gid, p.pw_dir, p.pw_shell)
        return (grp.getgrnam(name).gr_gid,)
    except KeyError:
        return "missing"


def _run(argv):
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    except OSError as e:
        return f"cannot run {argv[0]}: {e.strerror}"
    return f"{done.returncode} {done.stdout}"


def state(spec):
    """sha256 hex over the managed files, accounts, units and firewall table."""
    out = []
    for root in spec["roots"]:
        _walk(root, out, spec["stamp"])
    for path in spec["shallow"]:
        _entry(path, out, spec["stamp"])
    out.append(("user", _account("user", spec["user"])))
    out.append(("group", _account("group", spec["group"])))
    if spec["units"]:
        out.append(("units", _run(["systemctl", "show", "--property", "LoadState,ActiveState,UnitFileState"]
                                  + spec["units"])))
    if spec["nft"]:
        out.append(("nft", _run(["nft", "-s", "list", "table"] + spec["nft"].split())))
    return hashlib.sha256(json.dumps(out).encode()).hexdigest()


def main():
    spec = json.loads(sys.argv[1])
    try:
        with open(spec["stamp"]) as f:
            before = f.read().strip()
    except OSError:
        before = ""
    now = state(spec)
    if spec.get("record"):
        tmp = spec["stamp"] + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{spec['record']} {now}\n")
            os.rename(tmp, spec["stamp"])
        except OSError as e:
            if os.path.isfile(tmp):
                os.unlink(tmp)
            sys.exit(f"cannot write the stamp {spec['stamp']}: {e.strerror}")
    print(json.dumps({"stamp": before, "state": now}))


if __name__ == "__main__":
    main()
