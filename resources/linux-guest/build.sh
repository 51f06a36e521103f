#!/bin/bash
# Builds Ferry's Linux test guest from Debian packages (docs/linux-guest.md).
#
# Usage: resources/linux-guest/build.sh [--force]
#
# Downloads (apt-get download, never install) the newest
# linux-image-*-cloud-amd64-unsigned and busybox-static of the configured apt
# sources and builds, under resources/cache/linux-guest/<key>/:
#   bzImage            the package's kernel, as shipped
#   vmlinux            the ELF kernel extracted from it (extract-vmlinux)
#   initramfs.cpio.gz  busybox, the network modules (+ deps, depmod'ed), /init
#   manifest           key=value: packages, versions, findings, sha256s
# <key> names the two package versions and a hash of this recipe, so a new
# kernel, a new busybox or a changed /init each make a new directory. The
# symlink resources/cache/linux-guest/current points at the newest build.
# A valid cache is reused at once. The last line of stdout is the output
# directory; progress goes to stderr.
#
# Environment:
#   FERRY_GUEST_KERNEL_PACKAGE  a package name, or name=version, to use
#                               instead of the newest cloud kernel
#   FERRY_GUEST_BUSYBOX_VERSION a busybox-static version instead of newest
#   FERRY_GUEST_CACHE           cache root (default resources/cache/linux-guest)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache_root=${FERRY_GUEST_CACHE:-$repo/resources/cache/linux-guest}

# The modules the guest needs; dependencies are added by depmod/modprobe.
# Any of them built into the kernel is recorded as such and skipped.
modules=(virtio virtio_ring virtio_mmio virtio_pci virtio_net 8021q macvlan)

force=0
for a in "$@"; do
	case $a in
	--force) force=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "build.sh: unknown argument '$a' (try --help)" >&2
		exit 2
		;;
	esac
done

say() { echo "linux-guest: $*" >&2; }
die() {
	echo "linux-guest: error: $*" >&2
	exit 1
}

for tool in apt-get apt-cache dpkg dpkg-deb depmod modprobe cpio gzip xz zstd \
	od dd sha256sum flock find sort stat; do
	command -v "$tool" >/dev/null ||
		die "'$tool' is missing; install the build tools with resources/setup-host"
done

# --- which packages --------------------------------------------------------

# newest PKG... : prints "name version" of the highest version (dpkg order)
# among all versions of the given packages in the apt lists; ties go to the
# name that sorts last, so the choice never depends on list order.
newest() {
	local best_n="" best_v="" n v
	while read -r n v; do
		if [[ -z $best_v ]] || dpkg --compare-versions "$v" gt "$best_v" ||
			{ dpkg --compare-versions "$v" eq "$best_v" && [[ $n > $best_n ]]; }; then
			best_n=$n best_v=$v
		fi
	done < <(apt-cache madison "$@" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $1); gsub(/ /, "", $2); print $1, $2}')
	[[ -n $best_v ]] || return 1
	echo "$best_n $best_v"
}

kernel_candidates() {
	apt-cache pkgnames linux-image- 2>/dev/null |
		grep -E '^linux-image-[0-9][^ ]*-cloud-amd64-unsigned$' | LC_ALL=C sort
}

resolve() { # prints "kernel-package kernel-version busybox-version"
	local kpkg kver bbver
	if [[ -z $(kernel_candidates) ]]; then
		if [[ $(id -u) -eq 0 ]]; then
			say "no cloud kernel in the apt lists: running apt-get update"
			apt-get update -q >&2 || die "apt-get update failed"
		fi
		[[ -n $(kernel_candidates) ]] ||
			die "no linux-image-*-cloud-amd64-unsigned package in the apt lists; run 'apt-get update' as root (Debian sources for amd64 needed)"
	fi
	if [[ -n ${FERRY_GUEST_KERNEL_PACKAGE:-} ]]; then
		if [[ $FERRY_GUEST_KERNEL_PACKAGE == *=* ]]; then
			kpkg=${FERRY_GUEST_KERNEL_PACKAGE%%=*} kver=${FERRY_GUEST_KERNEL_PACKAGE#*=}
		else
			read -r kpkg kver < <(newest "$FERRY_GUEST_KERNEL_PACKAGE") ||
				die "FERRY_GUEST_KERNEL_PACKAGE=$FERRY_GUEST_KERNEL_PACKAGE: no such package in the apt lists"
		fi
	else
		mapfile -t candidates < <(kernel_candidates)
		read -r kpkg kver < <(newest "${candidates[@]}") ||
			die "cannot resolve the versions of the cloud kernel packages"
	fi
	if [[ -n ${FERRY_GUEST_BUSYBOX_VERSION:-} ]]; then
		bbver=$FERRY_GUEST_BUSYBOX_VERSION
	else
		read -r _ bbver < <(newest busybox-static) ||
			die "busybox-static is not in the apt lists; run 'apt-get update' as root"
	fi
	echo "$kpkg $kver $bbver"
}

# apt-cache takes about half a second a call here (no binary package cache),
# so the resolution is remembered for as long as the apt lists and the
# overrides stay the same: a valid cache is then found in a few milliseconds.
lists=/var/lib/apt/lists/
eval "$(apt-config shell lists Dir::State::Lists/d)"
apt_state=$({
	echo "${FERRY_GUEST_KERNEL_PACKAGE:-}|${FERRY_GUEST_BUSYBOX_VERSION:-}"
	{ find "$lists" -maxdepth 1 -type f -name '*Packages*' -printf '%f %s %T@\n' 2>/dev/null || true; } |
		LC_ALL=C sort
} | sha256sum | cut -c1-16)
memo=$cache_root/.resolved/$apt_state
if [[ -s $memo ]] && read -r kpkg kver bbver <"$memo" && [[ -n $bbver ]]; then
	:
else
	read -r kpkg kver bbver < <(resolve) || exit 1
	mkdir -p "${memo%/*}"
	echo "$kpkg $kver $bbver" >"$memo.$$"
	mv -f "$memo.$$" "$memo"
fi

# The recipe: every file of this directory that goes into the build.
recipe=$(cd "$here" && find build.sh extract-vmlinux rootfs -type f -print0 |
	LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
safe() { printf '%s' "$1" | tr -c 'A-Za-z0-9.+-' '_'; }
kname=${kpkg#linux-image-}
key="$(safe "${kname%-unsigned}")_$(safe "$kver")_busybox-$(safe "$bbver")_r$recipe"
out="$cache_root/$key"

outputs=(bzImage vmlinux initramfs.cpio.gz manifest)
valid() {
	local f
	for f in "${outputs[@]}"; do [[ -s $1/$f ]] || return 1; done
	grep -qx 'complete=1' "$1/manifest"
}

point_current() {
	ln -sfn "$key" "$cache_root/.current.$$"
	mv -Tf "$cache_root/.current.$$" "$cache_root/current"
}

mkdir -p "$cache_root"
# One build at a time (parallel tests call this script too); the winner
# builds, the others find its result valid once they get the lock.
exec 9>"$cache_root/.lock"
flock 9

if [[ $force -eq 0 ]] && valid "$out"; then
	[[ $(readlink "$cache_root/current" 2>/dev/null) == "$key" ]] || point_current
	echo "$out"
	exit 0
fi

say "building $key"
say "kernel package $kpkg $kver, busybox-static $bbver"
work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- download and unpack ---------------------------------------------------
mkdir -p "$work/deb"
if [[ $(id -u) -eq 0 ]] && id _apt >/dev/null 2>&1; then
	# Lets apt download as its own unprivileged user (no sandbox warning).
	chmod 0755 "$work"
	chown _apt "$work/deb"
fi
(cd "$work/deb" && apt-get download -q "$kpkg=$kver" "busybox-static=$bbver" >&2) ||
	die "apt-get download $kpkg=$kver busybox-static=$bbver failed"
kdeb=$(find "$work/deb" -name "${kpkg}_*.deb" -print -quit)
bbdeb=$(find "$work/deb" -name 'busybox-static_*.deb' -print -quit)
[[ -n $kdeb && -n $bbdeb ]] || die "downloaded packages not found in $work/deb"
mkdir "$work/kernel" "$work/busybox"
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bbdeb" "$work/busybox"

mapfile -t vmlinuz < <(find "$work/kernel/boot" -maxdepth 1 -name 'vmlinuz-*')
[[ ${#vmlinuz[@]} -eq 1 ]] || die "$kpkg: expected one /boot/vmlinuz-*, found ${#vmlinuz[@]}"
krel=${vmlinuz[0]##*/vmlinuz-}
kmod_dir=$work/kernel/lib/modules/$krel
[[ -d $kmod_dir ]] || die "$kpkg: no /lib/modules/$krel"
busybox=$work/busybox/bin/busybox
[[ -x $busybox ]] || die "busybox-static: no /bin/busybox"
# Everything in the guest carries the kernel's own timestamp (reproducible).
epoch=$(stat -c %Y "${vmlinuz[0]}")

mkdir "$work/out"
cp "${vmlinuz[0]}" "$work/out/bzImage"

# --- vmlinux ---------------------------------------------------------------
say "extracting vmlinux"
vm_info=$("$here/extract-vmlinux" "$work/out/bzImage" "$work/out/vmlinux")
compression=$(sed -n 's/^compression=//p' <<<"$vm_info")
elf_entry=$(sed -n 's/^elf_entry=//p' <<<"$vm_info")
pvh_entry=$(sed -n 's/^pvh_entry=//p' <<<"$vm_info")
say "kernel is $compression-compressed; vmlinux entry $elf_entry, PVH entry $pvh_entry"

# --- modules and their dependencies ----------------------------------------
# The package ships no modules.dep: compute it for the whole tree, then take
# the closure of the wanted modules.
say "resolving module dependencies"
depmod -b "$work/kernel" "$krel"
declare -A want=()
order=() builtin=()
for m in "${modules[@]}"; do
	deps=$(modprobe -d "$work/kernel" -S "$krel" --show-depends "$m" 2>&1) ||
		die "module $m is neither a module nor built into $krel: $deps"
	while read -r kind path _; do
		case $kind in
		builtin) builtin+=("$path") ;;
		insmod)
			rel=${path#"$kmod_dir"/}
			if [[ -z ${want[$rel]:-} ]]; then
				want[$rel]=1
				order+=("$rel")
			fi
			;;
		*) die "unexpected modprobe output for $m: $kind $path" ;;
		esac
	done <<<"$deps"
done

# --- initramfs tree --------------------------------------------------------
say "assembling the initramfs"
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,run,tmp,root,lib/modules/"$krel"}
cp -R "$here/rootfs/." "$root/"
chmod 0755 "$root/init"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
while read -r applet; do
	[[ $applet == bin/busybox ]] && continue
	[[ $applet == */* ]] && mkdir -p "$root/${applet%/*}"
	[[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)

included=()
for rel in "${order[@]}"; do
	dest=$root/lib/modules/$krel/$rel
	mkdir -p "${dest%/*}"
	# Stored uncompressed: busybox modprobe then needs no decompressor, and
	# the initramfs is compressed as a whole anyway.
	case $rel in
	*.ko.xz) xz -dc "$kmod_dir/$rel" >"${dest%.xz}" ;;
	*.ko.zst) zstd -qdc "$kmod_dir/$rel" >"${dest%.zst}" ;;
	*.ko.gz) gzip -dc "$kmod_dir/$rel" >"${dest%.gz}" ;;
	*.ko) cp "$kmod_dir/$rel" "$dest" ;;
	*) die "unexpected module file $rel" ;;
	esac
	name=${rel##*/}
	included+=("${name%%.ko*}")
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
	[[ -f $kmod_dir/$f ]] && cp "$kmod_dir/$f" "$root/lib/modules/$krel/"
done
depmod -b "$root" "$krel"
# modprobe must find every wanted module in the guest's own tree.
for m in "${modules[@]}"; do
	modprobe -d "$root" -S "$krel" --show-depends "$m" >/dev/null ||
		die "module $m does not resolve inside the initramfs"
done

# --- cpio ------------------------------------------------------------------
# newc entry header: magic + 13 fields of 8 hex digits; name and data are
# padded to 4 bytes. Used for the device node the kernel opens before /init
# runs (/dev/console), which an unprivileged build could not mknod.
cpio_entry() { # NAME MODE INO NLINK RDEVMAJOR RDEVMINOR
	local namesize=$((${#1} + 1)) pad
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$3" "$2" 0 0 "$4" "$epoch" 0 0 0 "$5" "$6" "$namesize" 0
	printf '%s\0' "$1"
	pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}
find "$root" -exec touch -h -d "@$epoch" {} +
{
	cpio_entry dev $((8#040755)) 1 2 0 0
	cpio_entry dev/console $((8#020600)) 2 1 5 1
	cpio_entry 'TRAILER!!!' 0 0 1 0 0
	(cd "$root" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
		cpio -o -H newc --reproducible -R 0:0 --quiet)
} | gzip -n -9 >"$work/out/initramfs.cpio.gz"

# --- manifest --------------------------------------------------------------
{
	echo "format=1"
	echo "key=$key"
	echo "kernel_package=$kpkg"
	echo "kernel_package_version=$kver"
	echo "kernel_release=$krel"
	echo "busybox_package=busybox-static"
	echo "busybox_package_version=$bbver"
	echo "recipe=$recipe"
	echo "kernel_compression=$compression"
	echo "vmlinux_entry=$elf_entry"
	echo "pvh_entry=$pvh_entry"
	echo "modules_builtin=${builtin[*]}"
	echo "modules=${included[*]}"
	for f in bzImage vmlinux initramfs.cpio.gz; do
		echo "sha256_$f=$(sha256sum "$work/out/$f" | cut -d' ' -f1)"
	done
	echo "complete=1"
} >"$work/out/manifest"

rm -rf "$out"
mv "$work/out" "$out"
point_current
say "built-in: ${builtin[*]:-none}; modules: ${included[*]}"
say "PVH entry: $pvh_entry"
echo "$out"
