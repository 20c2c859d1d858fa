#!/usr/bin/env bash
# Make a local base image for the Containerfile from Debian's own packages, for machines that reach no container
# registry: debootstrap a minimal bookworm (python3 3.11, venv, pip from Debian), import it into podman, tag it.
#
#   scripts/base-image.sh                       -> localhost/debian-python:bookworm
#   BASE_IMAGE=localhost/x:y SUITE=trixie MIRROR=http://... scripts/base-image.sh
#
# Then: make image BASE_IMAGE=localhost/debian-python:bookworm. Called by `make base-image`; needs root (or
# fakeroot) for debootstrap and the packages debootstrap and podman. Skips when the tag already exists (FORCE=1
# rebuilds it). Costs about a minute and 175 MB here.
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-localhost/debian-python:bookworm}"
SUITE="${SUITE:-bookworm}"
# The mirror apt already uses on this machine, else Debian's own.
default_mirror() {
  local uri
  uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
    | grep -v -- -security | head -n 1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR="${MIRROR:-$(default_mirror)}"
PACKAGES="python3,python3-venv,python3-pip,ca-certificates"

for tool in podman debootstrap; do
  command -v "$tool" > /dev/null || {
    echo "base-image: $tool is not installed; on Debian: apt-get install -y podman buildah crun runc fuse-overlayfs debootstrap" >&2
    exit 1
  }
done
if [[ -z "${FORCE:-}" ]] && podman image exists "$BASE_IMAGE"; then
  echo "base-image: $BASE_IMAGE exists (FORCE=1 rebuilds it)"
  exit 0
fi

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/qinfer-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
start=$SECONDS
echo "base-image: debootstrap --variant=minbase $SUITE from $MIRROR (+ $PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1 || {
  tail -n 20 "$rootfs.log" >&2
  echo "base-image: debootstrap failed (log above; full log in $rootfs.log)" >&2
  exit 1
}
rm -f "$rootfs.log"
# No package lists or caches in the image.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
python=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
tar -C "$rootfs" -c . | podman import --quiet \
  --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --message "debootstrap --variant=minbase $SUITE + $PACKAGES" - "$BASE_IMAGE" > /dev/null
size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
echo "base-image: $BASE_IMAGE (Debian $SUITE, Python $python): $((size / 1000000)) MB in $((SECONDS - start)) s"
