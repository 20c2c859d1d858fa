#!/usr/bin/env bash
# Write build/containers.conf, the podman settings `make image` and `make image-test` run with (CONTAINERS_CONF):
#   - default_ulimits nofile and nproc = this shell's own hard limits (nproc at most 32768): podman's defaults (1048576, 4194304) are
#     above what a nested container host may grant, and the OCI runtime then fails with
#     "setrlimit RLIMIT_NOFILE (or RLIMIT_NPROC): Operation not permitted";
#   - runtime = runc when it is installed (crun where it is not): on a host with hybrid cgroups crun refuses
#     ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2") where runc runs.
# Prints the file's path. Called by the Makefile; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
limit() { local value; value=$(ulimit "$1"); [[ "$value" == unlimited ]] && value=$2; echo "$value"; }
nofile=$(limit -Hn 1048576)
nproc=$(limit -Hu 32768)
# Measured on such a host: nproc 32768 is granted, 65536 is refused even under a hard limit of 96369.
((nproc > 32768)) && nproc=32768
runtime=crun
command -v runc > /dev/null && runtime=runc
cat > build/containers.conf <<CONF
# Written by scripts/containers-conf.sh; edit that script, not this file.
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "${runtime}"
CONF
echo build/containers.conf
