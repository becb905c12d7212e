#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do insmod $m || echo "@@INSMOD-FAILED $m"; done
echo @@BOOTED
[ -f /run.sh ] && . /run.sh
echo @@END
poweroff -f
