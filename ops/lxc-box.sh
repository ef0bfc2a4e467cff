#!/usr/bin/env bash
# Build the local cluster's Vagrant box for the LXC provider (vagrant-lxc 1.4 format) from
# debootstrap: Debian minbase + systemd, systemd-networkd, sshd, python3, sudo, nftables (a
# standard Debian install has it; the master's firewall needs it, the hosts have no mirror),
# for one suite.
#
#   ops/lxc-box.sh SUITE OUTPUT.box      SUITE: bullseye (Debian 11), bookworm (12) or trixie (13)
#
# Run as root on Debian (needs debootstrap). Mirror: TASKFLEET_DEBIAN_MIRROR (default
# http://deb.debian.org/debian). Writes OUTPUT.box atomically; `invoke cluster.up` calls it
# only when the box is missing, so delete the .box file to force a rebuild.
set -euo pipefail

suite=${1:?usage: $0 SUITE OUTPUT.box}
out=${2:?usage: $0 SUITE OUTPUT.box}
mirror=${TASKFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
vagrant_pub=${VAGRANT_INSECURE_PUB:-$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)}
packages=systemd,systemd-sysv,dbus,openssh-server,python3,python3-apt,sudo,iproute2,iputils-ping,procps,nftables

die() { echo "lxc-box: $*" >&2; exit 1; }
case $suite in
  bullseye | bookworm | trixie) ;;
  *) die "unknown suite '$suite' (want bullseye, bookworm or trixie)" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
[ -r "$vagrant_pub" ] || die "Vagrant's insecure public key not found (install the Debian package 'vagrant' or set VAGRANT_INSECURE_PUB)"

out_dir=$(dirname "$out")
mkdir -p "$out_dir"
work=$(realpath "$(mktemp -d "$out_dir/.box-build.XXXXXX")")
cleanup() {
  # debootstrap mounts proc/sys inside the target; never rm -rf through a live mount.
  awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" || true
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
root=$work/rootfs

echo "==> debootstrap $suite ($mirror) into $root" >&2
# debootstrap's own stage lines (I: Retrieving/Unpacking/Configuring ...) go to stderr: they are
# the progress `cluster.up` shows.
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >&2 \
  || die "debootstrap failed (see above)"

echo "==> configuring the image" >&2
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

echo localhost >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
EOF

# Networking: systemd-networkd. The addresses are given by LXC (lxc.net.N.ipv4.address) before
# init starts; networkd keeps them (KeepConfiguration=static) and adds no DHCP, link-local
# or RA addresses, so the node only ever has the address the Vagrantfile gave it.
cat >"$root/etc/systemd/network/80-lxc-static.network" <<'EOF'
[Match]
Name=eth*

[Network]
DHCP=no
LinkLocalAddressing=no
IPv6AcceptRA=no
KeepConfiguration=static
ConfigureWithoutCarrier=yes
EOF
in_root systemctl enable systemd-networkd.service >/dev/null 2>&1
# Not needed in a container and they only slow the boot down or fail there.
in_root systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true

# SSH: fresh ed25519 host key per node at first boot (RSA keygen costs ~1 s CPU per node).
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/ssh/sshd_config.d/10-taskfleet.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
UseDNS no
EOF
cat >"$root/etc/systemd/system/ssh-hostkey.service" <<'EOF'
[Unit]
Description=Generate the SSH host key on first boot
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
RequiredBy=ssh.service
EOF
in_root systemctl enable ssh-hostkey.service ssh.service >/dev/null 2>&1

# The vagrant user: passwordless sudo, Vagrant's insecure key (Vagrant swaps in a key of its
# own per machine on first `vagrant up`).
in_root useradd --create-home --shell /bin/bash vagrant
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
install -d -m 0700 "$root/home/vagrant/.ssh"
install -m 0600 "$vagrant_pub" "$root/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh

# Each node makes its own identity at first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$root/var/lib/dbus/machine-id"

# Smaller image: no package cache or lists (the nodes reach no mirror anyway).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log

echo "==> packing $out" >&2
cat >"$work/metadata.json" <<EOF
{"provider": "lxc", "version": "1.0.0", "built-on": "debootstrap $suite minbase"}
EOF
# common.conf comes with the lxc package (debian.common.conf would need lxc-templates too);
# an empty tty.dir is what Debian's own config sets for systemd guests.
cat >"$work/lxc-config" <<'EOF'
lxc.include = /usr/share/lxc/config/common.conf
lxc.tty.dir =
lxc.arch = x86_64
EOF
# vagrant-lxc's template untars with --strip-components=2: entries must start with ./rootfs/.
tar --numeric-owner --xattrs --xattrs-include='*' -C "$work" -cf - ./rootfs | gzip -1 >"$work/rootfs.tar.gz"
tar -C "$work" -cf "$work/out.box" metadata.json lxc-config rootfs.tar.gz
mv -f "$work/out.box" "$out"
echo "==> box ready: $out ($(du -h "$out" | cut -f1))" >&2
