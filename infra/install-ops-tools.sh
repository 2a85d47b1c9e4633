#!/bin/sh
# Installs the operations tools the tests use: promtool (Debian package prometheus), kcat
# (kcat, or kafkacat on older releases) and amtool (prometheus-alertmanager).
# A no-op when they are there. Without apt-get it prints one line and goes on: then the
# promtool and kcat tests of `make test` fail and say how to install them.
# Note: on a machine run by systemd, Debian's prometheus and prometheus-alertmanager
# packages also enable their services; `systemctl disable --now prometheus
# prometheus-alertmanager` if you only want the tools.
set -eu

missing=""
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v kcat >/dev/null 2>&1 || command -v kafkacat >/dev/null 2>&1 || missing="$missing kcat"
command -v amtool >/dev/null 2>&1 || missing="$missing prometheus-alertmanager"
[ -z "$missing" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: apt-get not found; install$missing yourself (promtool, kcat, amtool), or the ops tests fail"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
else
    echo "note: not root and no sudo; install$missing with apt-get yourself, or the ops tests fail"
    exit 0
fi

echo "installing$missing with apt-get"
$sudo apt-get update -qq || echo "note: apt-get update failed; trying the install anyway"
for package in $missing; do
    if [ "$package" = kcat ] && ! apt-cache show kcat >/dev/null 2>&1; then
        package=kafkacat  # Debian before 12 and Ubuntu before 22.04
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$package" >/dev/null \
        || echo "note: apt-get install $package failed; the ops tests that need it fail"
done
