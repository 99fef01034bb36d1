#!/usr/bin/env bash
# Install what the project needs on Debian bookworm: the apt packages (only the
# missing ones) and a virtualenv in .venv with the harness and its dependencies.
# Idempotent: a second run installs nothing and takes a second.
#
#   setup.sh               everything: build, runtime and tool packages + .venv
#   setup.sh apt           the apt packages only
#   setup.sh apt-build     what scripts/asterisk-build.sh needs (docker/ build stage)
#   setup.sh apt-runtime   what the installed Asterisk and harness.serve need
#   setup.sh apt-tools     runtime + what the tests and the bot use (no compiler)
#   setup.sh apt-docker-base  debootstrap, for scripts/docker-base.sh
#   setup.sh venv          the virtualenv only ($VENV, default .venv)
#
# ASTERISK_MARKS_CA_BUNDLE names a CA bundle apt and pip trust (a network
# whose TLS a proxy intercepts; docker/Dockerfile passes the build's).
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$top/.venv}
python=${PYTHON:-python3}

# Build dependencies of the trimmed Asterisk build (scripts/asterisk-build.sh).
readonly BUILD_PACKAGES=(
	build-essential pkg-config dpkg-dev git bzip2 patch xz-utils ca-certificates curl
	debian-archive-keyring
	libedit-dev libjansson-dev libxml2-dev libsqlite3-dev uuid-dev libssl-dev
	libncurses-dev libxslt1-dev
)
# Shared libraries of the installed Asterisk, and Python for harness.serve.
readonly RUNTIME_PACKAGES=(
	libedit2 libjansson4 libsqlite3-0 libssl3 libuuid1 libxml2 libxslt1.1 libstdc++6
	ca-certificates python3
)
# The harness: capture, the spoken prompt, the virtualenv, the test hosts
# of the network fault tests (ip netns, iptables' NFQUEUE and statistic, ss),
# upstream's testsuite (its virtualenv builds netifaces; runtests.py
# calls killall), and the benchmark's instruction counts (callgrind).
readonly TOOL_PACKAGES=(libpcap0.8 tcpdump espeak-ng sox python3-venv iproute2 iptables
	python3-dev psmisc valgrind)
# Base images built from Debian's archive where no registry answers.
readonly DOCKER_BASE_PACKAGES=(debootstrap)

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

missing_packages() {
	local p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
			|| printf '%s\n' "$p"
	done
}

install_apt() {
	command -v dpkg-query >/dev/null || die "this is not a Debian system (no dpkg-query);" \
		"install the packages listed in scripts/setup.sh by hand"
	local missing
	mapfile -t missing < <(missing_packages "$@")
	if [ ${#missing[@]} -eq 0 ]; then
		say "apt packages: all present"
		return 0
	fi
	local sudo=()
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null \
			|| die "missing packages (${missing[*]}) and not root: run 'make setup' as root"
		sudo=(sudo)
	fi
	# A CA bundle to trust (a proxy that intercepts TLS; docker/ passes one).
	local ca=()
	[ -n "${ASTERISK_MARKS_CA_BUNDLE:-}" ] && ca=(-o "Acquire::https::CAInfo=$ASTERISK_MARKS_CA_BUNDLE")
	say "apt packages: installing ${missing[*]}"
	if ! "${sudo[@]}" apt-get -q -o DPkg::Lock::Timeout=300 "${ca[@]}" update >/tmp/setup-apt-update.log 2>&1; then
		cat /tmp/setup-apt-update.log >&2
		die "apt-get update failed: no route to Debian's archive? Check the network" \
			"(or proxy) and run 'make setup' again"
	fi
	# Wait for another apt (an unattended upgrade, a second setup) rather than fail.
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get -q -o DPkg::Lock::Timeout=300 \
		"${ca[@]}" install -y --no-install-recommends \
		"${missing[@]}" >/tmp/setup-apt-install.log 2>&1 || {
		tail -n 30 /tmp/setup-apt-install.log >&2
		die "apt-get install failed; see /tmp/setup-apt-install.log"
	}
	say "apt packages: done"
}

install_venv() {
	"$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
		|| die "$python is older than Python 3.11 (or missing)"
	local stamp=$venv/.setup-stamp want
	want=$(cat "$top/pyproject.toml" | sha256sum | cut -d' ' -f1)
	if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
		say "virtualenv: up to date ($venv)"
		return 0
	fi
	say "virtualenv: creating $venv"
	"$python" -m venv "$venv" || die "cannot create a virtualenv: apt-get install python3-venv"
	say "virtualenv: installing the harness and its dependencies from PyPI"
	# In the environment, so that pip's build-dependency installs trust it too.
	[ -n "${ASTERISK_MARKS_CA_BUNDLE:-}" ] && export PIP_CERT=$ASTERISK_MARKS_CA_BUNDLE
	"$venv/bin/pip" install -q --disable-pip-version-check -e "$top[dev]" \
		>"$venv/pip.log" 2>&1 || {
		tail -n 30 "$venv/pip.log" >&2
		die "pip install failed (no route to PyPI?); see $venv/pip.log"
	}
	echo "$want" > "$stamp"
	say "virtualenv: done"
}

case "${1:-all}" in
apt) install_apt "${BUILD_PACKAGES[@]}" "${RUNTIME_PACKAGES[@]}" "${TOOL_PACKAGES[@]}" ;;
apt-build) install_apt "${BUILD_PACKAGES[@]}" ;;
apt-runtime) install_apt "${RUNTIME_PACKAGES[@]}" ;;
apt-tools) install_apt "${RUNTIME_PACKAGES[@]}" "${TOOL_PACKAGES[@]}" ;;
apt-docker-base) install_apt "${DOCKER_BASE_PACKAGES[@]}" ;;
venv) install_venv ;;
all)
	install_apt "${BUILD_PACKAGES[@]}" "${RUNTIME_PACKAGES[@]}" "${TOOL_PACKAGES[@]}"
	install_venv
	;;
*) die "usage: setup.sh [all|apt|apt-build|apt-runtime|apt-tools|apt-docker-base|venv]" ;;
esac
