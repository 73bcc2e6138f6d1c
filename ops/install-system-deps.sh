#!/usr/bin/env bash
# Installs the system packages zhuge's local services and tests use, when missing:
# redis-server, redis-cli (redis-tools, a dependency of Debian's redis-server: joins the
# tests' local Redis Cluster), Java 17 and Maven (the Kafka broker's jars come from Maven
# Central), openssl (the local CA of a TLS stack), Prometheus (the dashboard-query test) and the
# QEMU lab's parts: qemu-system-x86, a Debian kernel for the guests (linux-image-cloud-amd64),
# busybox-static, iproute2 (network namespaces, tc) and a C compiler with static libc (the
# guest workload); Chromium and its WebDriver (the web page's browser test) and wrk (the
# API's load test).
# Debian/Ubuntu (apt-get); used by `make install` (so `make demo` / `make test` on a
# fresh machine) and by .ci/run.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)  # joins the Redis Cluster of tests/integration/test_redis_cluster.py
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v openssl >/dev/null || need+=(openssl)
command -v prometheus >/dev/null || need+=(prometheus)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v cc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v wrk >/dev/null || need+=(wrk)
[ "${#need[@]}" -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "please install: ${need[*]} (no apt-get here)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u)
