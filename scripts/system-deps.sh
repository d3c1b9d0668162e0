#!/usr/bin/env bash
# The system packages lamina's tests and benches need: the one list, used by `make test`
# and by `.ci/run` alike, so that a newcomer's suite is CI's suite.
#
#   scripts/system-deps.sh install   as root with apt-get: install what is missing (one
#                                    line saying what); otherwise print what is missing,
#                                    which tests it costs, and how to install it
#   scripts/system-deps.sh check     print what is missing; exit 1 if anything is
#   scripts/system-deps.sh list      the packages, one per line
#   scripts/system-deps.sh tools     "package tool" pairs (a test checks that every tool
#                                    the tests look for is listed here; conftest names
#                                    the package in its skip reasons from it)
#   scripts/system-deps.sh tests     "package test" pairs: the test files that need each
#                                    (tests/unit/test_system_deps.py checks the column)
#
# LAMINA_NO_SYSTEM_DEPS=1 makes `install` do nothing (a machine set up by hand).
#
# Add a package here when a test or bench needs it; never to .ci/run alone.
set -euo pipefail

if [[ ${1:-install} == install && ${LAMINA_NO_SYSTEM_DEPS:-} == 1 ]]; then
  exit 0
fi

# package        | tools the tests look for      | why                                                   | tests (under tests/) that need it
PACKAGES=$(cat <<'END'
docker.io        | dockerd docker                | dockerd for the graph-driver plugin and image tests  | test_plugin_dockerd test_images_docker test_registry test_bench_smoke
containerd       | containerd ctr                | containerd for the proxy snapshotter tests           | test_snapshotter_containerd test_bench_smoke
runc             | runc                          | the OCI runtime containerd starts containers with    | test_snapshotter_containerd test_bench_smoke
docker-registry  | docker-registry               | a private registry for the pull and push tests       | test_registry test_registry_pipeline test_bench_smoke
skopeo           | skopeo                        | an independent registry client to check pull and push | test_registry test_registry_pipeline test_bench_smoke
xfsprogs         | mkfs.xfs xfs_quota            | xfs filesystems and project quotas                   | test_quota
zstd             | zstd                          | zstd-compressed layer archives                       | test_hostile_input
util-linux       | losetup mount setpriv unshare | loop devices, mounts, dropping privileges            | test_demo test_overlay_driver test_quota test_plugin_cleanup test_win_inspect test_fulldisk test_locked_trees test_snapshotter_containerd
e2fsprogs        | mkfs.ext4 chattr              | loop-mounted ext4 images for size limits; immutable files | test_overlay_driver test_quota test_plugin_cleanup test_win_inspect test_fulldisk test_locked_trees test_snapshotter_containerd
busybox-static   | busybox                       | the rootfs of the images the dockerd tests import    | test_plugin_dockerd test_images_docker test_snapshotter_containerd
debootstrap      | debootstrap                   | a real Debian base image for the benches             | (the benches: make bench)
tar              | tar                           | GNU tar, the reference of the benches and tests      | test_archive_export test_bench_smoke
gcc              | gcc                           | compiles lamina's C speedups (pip install -e .; without it the pure-Python path runs) | test_speedups
python3-dev      | python3-config                | the Python headers the C speedups compile against    | test_speedups
systemd          | systemd-analyze               | checks the contrib/ systemd units                    | test_plugin_protocol
END
)

# column N of every row, trimmed
column() { awk -F'|' -v n="$1" '{gsub(/^ +| +$/, "", $n); print $n}' <<<"$PACKAGES"; }
row() { awk -F'|' -v p="$1" '{k = $1; gsub(/ /, "", k)} k == p' <<<"$PACKAGES"; }
tools_of() { row "$1" | awk -F'|' '{print $2}'; }
why() { row "$1" | awk -F'|' '{gsub(/^ +| +$/, "", $3); print $3}'; }
tests_of() { row "$1" | awk -F'|' '{gsub(/^ +| +$/, "", $4); print $4}'; }

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# Without dpkg (not Debian), judge a package by the tools it provides.
tools_present() {
  local tool
  for tool in $(tools_of "$1"); do
    command -v "$tool" >/dev/null 2>&1 || return 1
  done
}

missing() {
  local pkg
  for pkg in $(column 1); do
    if command -v dpkg-query >/dev/null 2>&1; then
      installed "$pkg" || echo "$pkg"
    else
      tools_present "$pkg" || echo "$pkg"
    fi
  done
  # `make venv` needs ensurepip; Debian ships it apart as python3-venv. Only ask for it
  # when the python3 in use lacks it (a pyenv or source build already has it).
  if ! "${PYTHON:-python3}" -c 'import ensurepip' 2>/dev/null; then
    echo python3-venv
  fi
}

case "${1:-install}" in
  list) column 1 ;;
  tools)
    for pkg in $(column 1); do
      for tool in $(tools_of "$pkg"); do echo "$pkg $tool"; done
    done ;;
  tests)
    for pkg in $(column 1); do
      for t in $(tests_of "$pkg"); do [[ $t == test_* ]] && echo "$pkg $t"; done
    done ;;
  check)
    mapfile -t miss < <(missing)
    if ((${#miss[@]})); then
      echo "missing system packages: ${miss[*]}"
      exit 1
    fi
    echo "all system packages present" ;;
  install)
    mapfile -t miss < <(missing)
    ((${#miss[@]})) || exit 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
      {
        echo "system-deps: not installing (needs root and apt-get); tests that need these skip:"
        for pkg in "${miss[@]}"; do
          printf '  %-16s %s\n' "$pkg" "$(why "$pkg")"
          needed=$(tests_of "$pkg")
          [[ -z $needed ]] || printf '  %-16s needed by: %s\n' "" "$needed"
        done
        echo "  to install: sudo apt-get install ${miss[*]}   (or run make test as root)"
      } >&2
      exit 0
    fi
    echo "system-deps: apt-get installing ${miss[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${miss[@]}" >/dev/null ;;
  *)
    echo "usage: $0 [install|check|list|tools|tests]" >&2
    exit 2 ;;
esac
