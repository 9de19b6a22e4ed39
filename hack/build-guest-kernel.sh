#!/usr/bin/env bash
# Builds the container-mode guest boot assets from Debian packages only
# (linux-image-amd64, busybox-static, kmod):
#
#   $ZM_CACHE/guest/<kernel-version>-<inputs hash>/vmlinuz
#   $ZM_CACHE/guest/<kernel-version>-<inputs hash>/initramfs.img   (busybox + modules + hack/initramfs/init)
#
# and prints that directory on stdout (progress goes to stderr). Cached: a
# stamp of every input (kernel version, busybox version, this script, the
# initramfs files) decides whether anything is rebuilt, so a second run is
# instant. ZM_CACHE defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator.
#
#   build-guest-kernel.sh --init FILE --output IMG
#       packs the same busybox + modules with FILE as /init into IMG instead
#       (tests use it to give a "VM-mode" flist root its own initrd).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
initramfs_src=$here/initramfs
cache=${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}
# Modules the guest needs; their dependencies come from modules.dep.
# crc32c_generic: libcrc32c (btrfs) asks the crypto API for crc32c, which
# would need a userspace modprobe the initramfs does not have.
modules=(
  virtio_pci virtio_blk virtio_net virtio_console
  fuse virtiofs overlay
  vfat nls_cp437 nls_iso8859-1 nls_ascii nls_utf8
  crc32c_generic ext4 btrfs
  button
)

log() { echo "[guest-kernel] $*" >&2; }
die() { echo "[guest-kernel] error: $*" >&2; exit 1; }

custom_init="" output=""
while (($#)); do
  case $1 in
    --init) custom_init=$(realpath "${2:?--init needs a file}"); shift 2 ;;
    --output) output=$(realpath -m "${2:?--output needs a path}"); shift 2 ;;
    -h|--help) sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -z $custom_init && -z $output ]] || [[ -n $custom_init && -n $output ]] ||
  die "--init and --output go together"

require_pkg() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" ||
    die "Debian package $1 is not installed (run hack/install-system-deps.sh)"
}
require_pkg linux-image-amd64
require_pkg busybox-static
require_pkg kmod

# linux-image-amd64 is a meta package: its dependency names the real image.
kpkg=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*' | head -n1)
[[ -n $kpkg ]] || die "cannot tell the kernel package from linux-image-amd64's Depends"
kver=${kpkg#linux-image-}
require_pkg "$kpkg"
vmlinuz=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver
busybox=/bin/busybox
[[ -r $vmlinuz ]] || die "$vmlinuz missing (package $kpkg)"
[[ -r $moddir/modules.dep ]] || die "$moddir/modules.dep missing (package $kpkg)"
dpkg -L busybox-static | grep -qx "$busybox" || die "busybox-static does not ship $busybox"

# Prints the .ko paths (relative to $moddir) of the modules and their
# dependencies, dependencies first, each once.
declare -A seen=()
resolve() {
  local rel=$1 line dep
  [[ -n ${seen[$rel]:-} ]] && return 0
  seen[$rel]=1
  line=$(grep -m1 "^$rel:" "$moddir/modules.dep") || die "$rel not in $moddir/modules.dep"
  # modules.dep lists a module's dependencies so that the last must load first.
  local deps=(${line#*:})
  local i
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do resolve "${deps[i]}"; done
  echo "$rel"
}
module_paths() {
  local m file
  for m in "${modules[@]}"; do
    file=$(modinfo -k "$kver" -F filename "$m" 2>/dev/null) || die "module $m not found for $kver"
    [[ $file == "(builtin)" || $file == "" ]] && continue
    resolve "${file#"$moddir"/}"
  done
}

# Packs busybox, the modules and $1 as /init into the gzip'd cpio $2.
pack() {
  local init=$1 out=$2 stage rel
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  mkdir -p "$stage"/{bin,dev,proc,sys,run,tmp,seed,new_root,lib/modules,lib/zm,etc}
  install -m 0755 "$busybox" "$stage/bin/busybox"
  local applet
  for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -s busybox "$stage/bin/$applet"
  done
  ln -s bin "$stage/sbin"
  install -m 0755 "$init" "$stage/init"
  install -m 0644 "$initramfs_src/seed.awk" "$stage/lib/zm/seed.awk"
  : >"$stage/lib/modules/load.order"
  while read -r rel; do
    install -m 0644 "$moddir/$rel" "$stage/lib/modules/${rel##*/}"
    echo "${rel##*/}" >>"$stage/lib/modules/load.order"
  done < <(module_paths)
  echo "$kver" >"$stage/etc/zm-kernel-version"
  (cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --reproducible --quiet -R 0:0) | gzip -9n >"$out.tmp"
  mv "$out.tmp" "$out"
}

if [[ -n $custom_init ]]; then
  log "packing $custom_init as /init into $output (kernel $kver)"
  pack "$custom_init" "$output"
  echo "$output"
  exit 0
fi

stamp=$(
  {
    echo "kernel $kver $(dpkg-query -W -f='${Version}' "$kpkg")"
    echo "busybox $(dpkg-query -W -f='${Version}' busybox-static)"
    echo "modules ${modules[*]}"
    sha256sum "$0" "$initramfs_src"/init "$initramfs_src"/seed.awk | cut -d' ' -f1
  } | sha256sum | cut -d' ' -f1
)
# One directory per set of inputs: checkouts with different inits (branches, worktrees)
# sharing the cache never rebuild over each other's initramfs.
dest=$cache/guest/$kver-${stamp:0:12}
mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9

if [[ -f $dest/.stamp && $(cat "$dest/.stamp") == "$stamp" && -s $dest/vmlinuz && -s $dest/initramfs.img ]]; then
  log "up to date: $dest"
  echo "$dest"
  exit 0
fi

log "building guest assets for kernel $kver into $dest"
rm -f "$dest/.stamp"
install -m 0644 "$vmlinuz" "$dest/vmlinuz.tmp"
mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
pack "$initramfs_src/init" "$dest/initramfs.img"
echo "$stamp" >"$dest/.stamp"
log "done: vmlinuz $(du -h "$dest/vmlinuz" | cut -f1), initramfs.img $(du -h "$dest/initramfs.img" | cut -f1)"
echo "$dest"
