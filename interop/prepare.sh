#!/usr/bin/env bash
# Prepares the kernel side of `cargo xtask interop`: Debian sid's Linux 7.2.13
# (whose config leaves CONFIG_DM_PCACHE unset), dm-pcache built out of tree
# from linux-source-7.2 with the kernel's own compiler (gcc-16, in a sid
# chroot), and an initramfs with busybox, dmsetup and the modules.
#
# Everything lives in $CACHE (outside the repository); each step leaves a
# stamp and is skipped when its stamp exists, so a second run takes seconds.
# The system's apt sources are never changed: sid is reached through an apt
# configuration of its own under $CACHE/apt.
#
# Shell is the right tool here: this is apt, debootstrap, tar and make in a
# row. The Rust side (interop/src/prepare.rs) runs it and checks its outputs.
set -euo pipefail

: "${CACHE:?}" "${KVER:?}" "${SRCVER:?}" "${MIRROR:?}"
mkdir -p "$CACHE"
cd "$CACHE"
step() { echo "@@STEP $*"; }
done_() { [ -e "stamps/$1" ]; }
mark() { mkdir -p stamps; touch "stamps/$1"; }

APT=(-o "Dir::Etc::SourceList=$CACHE/apt/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o "Dir::State=$CACHE/apt/state" -o "Dir::State::status=$CACHE/apt/state/status"
     -o "Dir::Cache=$CACHE/apt/cache" -o Acquire::Check-Valid-Until=false
     -o APT::Architecture=amd64 -o APT::Sandbox::User=root -q)

if ! done_ apt-lists; then
  step "apt lists of Debian sid"
  mkdir -p apt/etc apt/state/lists/partial apt/cache/archives/partial
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main" > apt/etc/sources.list
  touch apt/state/status
  apt-get "${APT[@]}" update
  mark apt-lists
fi

PKGS=(linux-binary-$KVER linux-modules-$KVER linux-headers-$KVER
      linux-headers-${KVER%-amd64}-common linux-kbuild-${KVER%-amd64} linux-base-$KVER
      linux-source-$SRCVER)
if ! done_ debs; then
  step "download the kernel packages (about 300 MB)"
  mkdir -p debs
  (cd debs && apt-get "${APT[@]}" download "${PKGS[@]}")
  mark debs
fi

if ! done_ chroot; then
  step "debootstrap a sid chroot with gcc-16 (the kernel's compiler)"
  rm -rf chroot chroot.tmp
  debootstrap --variant=minbase \
    --include=gcc-16,make,libc6-dev,xz-utils,kmod,dmsetup,busybox-static,libelf1t64 \
    sid chroot.tmp "$MIRROR"
  mv chroot.tmp chroot
  mark chroot
fi

if ! done_ headers; then
  step "install the kernel headers into the chroot"
  for p in linux-headers-$KVER linux-headers-${KVER%-amd64}-common linux-kbuild-${KVER%-amd64} linux-base-$KVER; do
    dpkg-deb -x debs/${p}_*.deb chroot
  done
  mark headers
fi

if ! done_ module; then
  step "build dm-pcache out of tree (CONFIG_DM_PCACHE=m)"
  rm -rf chroot/build && mkdir -p chroot/build
  dpkg-deb --fsys-tarfile debs/linux-source-${SRCVER}_*.deb \
    | tar -xO ./usr/src/linux-source-$SRCVER.tar.xz \
    | tar -xJ -C chroot/build --strip-components=1 \
        --wildcards "linux-source-$SRCVER/drivers/md/dm-pcache/*" "linux-source-$SRCVER/drivers/md/*.h"
  # objtool reads /proc/self/limits. BTF for the module is left out
  # (CONFIG_DEBUG_INFO_BTF_MODULES=): it needs pahole and the kernel's
  # vmlinux, and the module loads and runs the same without it.
  mountpoint -q chroot/proc || mount -t proc proc chroot/proc
  trap 'umount chroot/proc 2>/dev/null || true' EXIT
  chroot chroot make -C /usr/src/linux-headers-$KVER M=/build/drivers/md/dm-pcache \
    CONFIG_DM_PCACHE=m CONFIG_DEBUG_INFO_BTF_MODULES= CC=x86_64-linux-gnu-gcc-16 modules > module-build.log 2>&1 \
    || { echo "module build failed: see $CACHE/module-build.log" >&2; tail -20 module-build.log >&2; exit 1; }
  umount chroot/proc
  sha256sum chroot/build/drivers/md/dm-pcache/dm-pcache.ko > module.sha256
  mark module
fi

if ! done_ initramfs; then
  step "initramfs (busybox, dmsetup, modules)"
  rm -rf initrd && mkdir -p initrd/{bin,sbin,lib,lib64,dev,proc,sys,tmp,modules}
  cp chroot/usr/bin/busybox initrd/bin/busybox
  cp chroot/usr/sbin/dmsetup initrd/sbin/dmsetup
  # dmsetup's shared libraries, as the chroot's loader resolves them.
  for lib in $(chroot chroot ldd /usr/sbin/dmsetup | grep -o '/[^ ]*'); do
    mkdir -p "initrd$(dirname "$lib")"
    cp -L "chroot$lib" "initrd$lib"
  done
  mkdir -p modx
  dpkg-deb -x debs/linux-modules-${KVER}_*.deb modx
  M=modx/usr/lib/modules/$KVER/kernel
  i=0
  for m in drivers/nvdimm/libnvdimm drivers/nvdimm/nd_btt drivers/nvdimm/nd_pmem \
           drivers/nvdimm/nd_virtio drivers/nvdimm/virtio_pmem drivers/block/virtio_blk drivers/md/dm-mod; do
    i=$((i + 1))
    xz -dc "$M/$m.ko.xz" > "initrd/modules/$(printf %02d $i)-$(basename $m).ko"
  done
  cp chroot/build/drivers/md/dm-pcache/dm-pcache.ko initrd/modules/99-dm-pcache.ko
  rm -rf modx
  cp "$INIT" initrd/init
  chmod +x initrd/init
  dpkg-deb -x debs/linux-binary-${KVER}_*.deb binx
  cp binx/usr/lib/modules/$KVER/vmlinuz vmlinuz
  rm -rf binx
  (cd initrd && find . | cpio -o -H newc --quiet) > initrd-base.cpio
  mark initramfs
fi
echo "@@READY $CACHE"
