#!/bin/bash
# Manual end-to-end check of the Linux test guest under QEMU with software
# emulation (TCG, no KVM), on the same device path Ferry uses: a microvm
# whose virtio-mmio NIC is described in the ACPI DSDT (LNRO0005). Not part of
# the test suite (it needs QEMU and takes about a minute); see
# docs/linux-guest.md for what it checks and the figures it gave.
#
# Usage (root: it creates a network namespace and a TAP inside it):
#   resources/linux-guest/validate-qemu.sh
# Needs: qemu-system-x86, iproute2, iputils-ping, tcpdump, socat
# (resources/setup-host installs them). Only 198.18.0.0/15 addresses are
# used, only inside a namespace of its own, which is deleted on exit.
# shellcheck disable=SC2016 # the $... in single quotes are for the guest's shell
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $(id -u) -eq 0 ]] || {
	echo "validate-qemu: run as root (network namespace + TAP)" >&2
	exit 1
}
for tool in qemu-system-x86_64 ip ping tcpdump socat; do
	command -v "$tool" >/dev/null || {
		echo "validate-qemu: '$tool' is missing (resources/setup-host installs it)" >&2
		exit 1
	}
done

guest=$("$here/build.sh" | tail -n 1)
ns=ferry-lgv-$$
tap=lgv0
work=$(mktemp -d /tmp/ferry-lgv.XXXXXX)
qpid="" cpid="" tdpid=""
failures=0

cleanup() {
	set +e
	[[ -n $qpid ]] && kill "$qpid" 2>/dev/null
	[[ -n $tdpid ]] && kill "$tdpid" 2>/dev/null
	[[ -n $cpid ]] && kill "$cpid" 2>/dev/null
	ip netns del "$ns" 2>/dev/null
	if [[ $failures -eq 0 ]]; then rm -rf "$work"; else echo "logs kept in $work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ok() { echo "ok: $*"; }
fail() {
	echo "FAIL: $*"
	failures=$((failures + 1))
}

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add dev "$tap" mode tap
ip -n "$ns" addr add 198.18.0.1/24 dev "$tap"
ip -n "$ns" link set "$tap" up
host_mac=$(ip -n "$ns" -o link show "$tap" | sed -n 's/.*link\/ether \([0-9a-f:]*\).*/\1/p')

# Under TCG the guest's TSC runs at the host's TSC rate, but calibrating it
# against the emulated PIT is unreliable (timing depends on the host's load),
# and a microvm has no HPET or ACPI PM timer to fall back on: a failed
# calibration leaves the kernel stuck after "Marking TSC unstable". So the
# microvm boots are told the rate.
host_khz=$(awk -F': *' '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
tsc="tsc_early_khz=$host_khz"
mac=52:54:00:12:34:56 # the NIC of every boot

# boot NAME KERNEL APPEND QEMU-ARGS...: starts QEMU in the namespace with the
# serial console on FIFOs; the console output goes to $work/NAME.log.
boot() {
	local name=$1 kernel=$2 append=$3
	shift 3
	mkfifo "$work/$name.in" "$work/$name.out"
	log=$work/$name.log
	t0=$(date +%s%N)
	ip netns exec "$ns" qemu-system-x86_64 -cpu max -m 512M -nodefaults -no-user-config \
		-display none -no-reboot -chardev pipe,id=con,path="$work/$name" -serial chardev:con \
		-kernel "$kernel" -initrd "$guest/initramfs.cpio.gz" -append "console=ttyS0 $append" \
		"$@" >"$work/$name.qemu" 2>&1 &
	qpid=$!
	cat "$work/$name.out" >"$log" &
	cpid=$!
}

# wait_for PATTERN SECONDS: until the console shows PATTERN (fixed string).
wait_for() {
	local deadline=$(($(date +%s) + $2))
	while ! grep -qF -- "$1" "$log"; do
		if ! kill -0 "$qpid" 2>/dev/null || (($(date +%s) > deadline)); then
			return 1
		fi
		sleep 0.05
	done
}

# send LINE: types a line on the guest console.
send() { printf '%s\n' "$1" >&"$con"; }

# quit SECONDS: waits for QEMU to end by itself; prints its status.
quit() {
	local i
	for ((i = 0; i < $1 * 10; i++)); do
		kill -0 "$qpid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$qpid" 2>/dev/null; then
		kill "$qpid"
		wait "$qpid" 2>/dev/null || true
		qpid=""
		return 1
	fi
	wait "$qpid" || return 1
	qpid=""
	wait "$cpid" 2>/dev/null || true
	cpid=""
}

marker_check() { # NAME: the marker is there, with no errors; prints its time
	if wait_for FERRY-GUEST-READY 300; then
		local ms=$((($(date +%s%N) - t0) / 1000000))
		marker=$(grep -a -o 'FERRY-GUEST-READY.*' "$log" | head -n 1 | tr -d '\r')
		ok "$1: marker after $ms ms: $marker"
		[[ $marker == *" errors=0"* ]] || fail "$1: the guest reported errors"
	else
		fail "$1: no marker (console log: $log)"
		marker=""
		kill "$qpid" 2>/dev/null
		wait "$qpid" 2>/dev/null || true
		qpid=""
		return 1
	fi
	exec {con}>"$work/$1.in"
}

has_token() { # TOKEN: the marker contains it as a whole word
	if [[ " $marker " == *" $1 "* ]]; then ok "marker has $1"; else fail "marker lacks $1"; fi
}

# --- raw frames, for the VLANs (hosts often lack 802.1Q themselves) --------
hex_ip() {
	local IFS=.
	# shellcheck disable=SC2086 # split the dotted quad
	set -- $1
	printf '%02x%02x%02x%02x' "$1" "$2" "$3" "$4"
}
csum() { # HEX -> the Internet checksum of those bytes, as 4 hex digits
	local h=$1 s=0 i
	((${#h} % 4 == 0)) || h=${h}00
	for ((i = 0; i < ${#h}; i += 4)); do s=$((s + 16#${h:i:4})); done
	while ((s >> 16)); do s=$(((s & 0xffff) + (s >> 16))); done
	printf '%04x' $((~s & 0xffff))
}
send_frame() { # HEX: transmitted on the TAP, i.e. delivered to the guest
	local h=$1
	while ((${#h} < 120)); do h=${h}00; done
	local e="" i
	for ((i = 0; i < ${#h}; i += 2)); do e="$e\\x${h:i:2}"; done
	printf '%b' "$e" | ip netns exec "$ns" socat -u - "INTERFACE:$tap"
}
me_mac=02:fe:00:00:00:01 # a MAC of our own for the frames we inject
me=${me_mac//:/}
vlan_arp() { # VID TARGET-IP SOURCE-IP
	send_frame "ffffffffffff${me}8100$(printf '%04x' "$1")08060001080006040001${me}$(hex_ip "$3")000000000000$(hex_ip "$2")"
}
vlan_ping() { # VID GUEST-MAC TARGET-IP SOURCE-IP
	local icmp ip
	icmp="08000000abcd0001$(printf 'ferry-vlan-%04d' "$1" | od -An -tx1 | tr -d ' \n')"
	icmp="${icmp:0:4}$(csum "$icmp")${icmp:8}"
	ip="4500$(printf '%04x' $((20 + ${#icmp} / 2)))0000400040010000$(hex_ip "$4")$(hex_ip "$3")"
	ip=${ip:0:20}$(csum "$ip")${ip:24}
	send_frame "${2//:/}${me}8100$(printf '%04x' "$1")0800${ip}${icmp}"
}

# === 1. microvm + bzImage + virtio-mmio NIC: eth0, VLAN, macvlans ==========
phase_net() {
	echo "== microvm, bzImage, network (TCG)"
	ip netns exec "$ns" tcpdump -i "$tap" -t -e -nn -l >"$work/tcpdump.txt" 2>"$work/tcpdump.err" &
	tdpid=$!
	for _ in $(seq 50); do
		grep -q listening "$work/tcpdump.err" && break
		sleep 0.1
	done

	boot net "$guest/bzImage" \
		"$tsc ferry.ip=198.18.0.2/24 ferry.vlan=100:198.18.100.2/24 ferry.macvlan=02:00:00:00:01:01:198.18.0.3/24,02:00:00:00:01:02@100:198.18.100.3/24 ferry.gw=198.18.0.1" \
		-M microvm -global virtio-mmio.force-legacy=false \
		-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "virtio-net-device,netdev=n0,mac=$mac"
	marker_check net || return 0
	has_token "if=eth0,$mac,198.18.0.2/24"
	has_token "if=eth0.100,$mac,198.18.100.2/24"
	has_token "if=mv0,02:00:00:00:01:01,198.18.0.3/24"
	has_token "if=mv1,02:00:00:00:01:02,198.18.100.3/24"

	for a in 198.18.0.2:$mac 198.18.0.3:02:00:00:00:01:01; do
		addr=${a%%:*} want=${a#*:}
		if ip netns exec "$ns" ping -c 2 -W 3 -q "$addr" >/dev/null; then ok "ping $addr"; else fail "ping $addr"; fi
		got=$(ip -n "$ns" neigh show "$addr" | sed -n 's/.*lladdr \([0-9a-f:]*\).*/\1/p')
		if [[ $got == "$want" ]]; then ok "$addr is behind $want"; else fail "$addr is behind '$got', not $want"; fi
	done

	for a in 198.18.100.2:$mac 198.18.100.3:02:00:00:00:01:02; do
		addr=${a%%:*} want=${a#*:}
		vlan_arp 100 "$addr" 198.18.100.1
		sleep 1
		vlan_ping 100 "$want" "$addr" 198.18.100.1
	done
	send 'tty; sleep 30 & jobs; kill %1; echo "SHELL-$((6 * 7))"'
	if wait_for SHELL-42 30; then ok "the shell runs commands"; else fail "no answer from the shell"; fi
	send 'echo "NIC-AT-$(readlink -f /sys/class/net/eth0/device)"'
	if wait_for 'NIC-AT-/sys/devices/platform/LNRO0005:00/virtio' 30; then
		ok "eth0 is the virtio-mmio device the DSDT describes (LNRO0005)"
	else
		fail "eth0 did not come from the LNRO0005 ACPI device"
	fi
	send 'exit'
	sleep 1
	send 'echo "RESPAWNED-$((2 * 3))"'
	if wait_for RESPAWNED-6 30; then ok "the shell is started again after exit"; else fail "no shell after exit"; fi
	if grep -qa '/dev/ttyS0' "$log" && grep -qa '^\[1\]' "$log" &&
		! grep -qa 'job control turned off' "$log"; then
		ok "the shell has the console as controlling tty (job control)"
	else
		fail "no job control on the console"
	fi
	sleep 1
	kill "$tdpid"
	wait "$tdpid" 2>/dev/null || true
	tdpid=""
	for a in 198.18.100.2:$mac 198.18.100.3:02:00:00:00:01:02; do
		addr=${a%%:*} want=${a#*:}
		if grep -q "^$want > $me_mac, ethertype 802.1Q (0x8100), length [0-9]*: vlan 100, .*ARP.*Reply $addr is-at $want" "$work/tcpdump.txt"; then
			ok "VLAN 100: ARP reply for $addr from $want"
		else
			fail "VLAN 100: no ARP reply for $addr from $want"
		fi
		if grep -q "^$want > $me_mac, ethertype 802.1Q (0x8100), length [0-9]*: vlan 100, .*$addr > 198.18.100.1: ICMP echo reply" "$work/tcpdump.txt"; then
			ok "VLAN 100: ICMP echo reply from $addr ($want)"
		else
			fail "VLAN 100: no ICMP echo reply from $addr ($want)"
		fi
	done
	if grep -q "^02:00:00:00:01:01 > $host_mac, ethertype IPv4 (0x0800), .*198.18.0.3 > 198.18.0.1: ICMP echo reply" "$work/tcpdump.txt"; then
		ok "replies from 198.18.0.3 leave with mv0's MAC"
	else
		fail "replies from 198.18.0.3 do not carry mv0's MAC"
	fi
	send 'poweroff -f'
	if quit 30; then ok "poweroff -f ends QEMU (status 0)"; else fail "poweroff -f did not end QEMU cleanly"; fi
	exec {con}>&-
}

# === 2. microvm + vmlinux through PVH, no parameters, reboot -f ============
phase_pvh() {
	local pvh
	pvh=$(sed -n 's/^pvh_entry=//p' "$guest/manifest")
	if [[ $pvh == none ]]; then
		echo "== no PVH note in vmlinux: PVH boot not checked"
		return 0
	fi
	echo "== microvm, vmlinux via PVH (entry $pvh), no parameters, no NIC (TCG)"
	boot pvh "$guest/vmlinux" "$tsc" -M microvm
	marker_check pvh || return 0
	send 'reboot -f'
	if quit 30; then ok "reboot -f ends QEMU (-no-reboot)"; else fail "reboot -f did not end QEMU"; fi
	exec {con}>&-
}

# === 3. pc + bzImage + virtio-pci NIC ======================================
phase_pc() {
	echo "== pc, bzImage, virtio-net-pci (TCG)"
	boot pc "$guest/bzImage" "ferry.ip=198.18.0.2/24" -M pc \
		-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "virtio-net-pci,netdev=n0,mac=$mac"
	marker_check pc || return 0
	if ip netns exec "$ns" ping -c 2 -W 3 -q 198.18.0.2 >/dev/null; then ok "pc: ping 198.18.0.2"; else fail "pc: ping 198.18.0.2"; fi
	send 'poweroff -f'
	if quit 30; then ok "pc: poweroff -f ends QEMU"; else fail "pc: poweroff -f did not end QEMU"; fi
	exec {con}>&-
}

phase_net
phase_pvh
phase_pc

if ((failures == 0)); then
	echo "validate-qemu: all checks passed"
else
	echo "validate-qemu: $failures checks failed"
	exit 1
fi
