#!/usr/bin/env bash
# Make sure the Debian base images docker/Dockerfile starts from exist in the
# local Docker engine: debian:bookworm and debian:bookworm-slim.
#
# An image already present is used as it is. A missing one is pulled; where no
# registry answers (an offline or registry-less machine), it is built here
# from Debian's archive with debootstrap, from the Debian mirror this
# machine's own apt configuration uses, and `docker import`ed under the same
# tag. The slim image is the same system with documentation, manual pages and
# translations removed, as Debian's official slim images are made.
#
#   docker-base.sh            ensure both images (pull, else debootstrap)
#   docker-base.sh --rebuild  debootstrap both again, even if present
#   docker-base.sh mirror     print the mirror and suites the images would use
#
# Environment:
#   DEBIAN_IMAGE, DEBIAN_SLIM_IMAGE   the tags (default debian:bookworm, -slim)
#   DEBIAN_MIRROR                     use this mirror instead of apt's
#   TMPDIR                            where the tree is built (removed after;
#                                     default /var/tmp, about 250 MB)
#
# debootstrap, and reading the tree it makes, need root: as another user the
# script runs those steps (only those) through sudo; docker runs as the user.
set -euo pipefail

readonly SUITE=bookworm
image=${DEBIAN_IMAGE:-debian:$SUITE}
slim_image=${DEBIAN_SLIM_IMAGE:-debian:$SUITE-slim}
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
self=$top/scripts/docker-base.sh
started=$SECONDS

log() {
	local t=$((SECONDS - started))
	printf '[docker-base %02d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*" >&2
}

die() {
	printf 'docker-base: error: %s\n' "$*" >&2
	exit 1
}

# Run this script's internal command "$@" as root.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$self" "$@"
	else
		command -v sudo >/dev/null || die "debootstrap needs root, and there is no sudo"
		sudo --preserve-env=DEBIAN_MIRROR,TMPDIR "$self" "$@"
	fi
}

# The repository (URI) apt uses for Debian's suite $1, component main, read
# from apt's own view of its sources (one-line or deb822 files alike).
# Empty when apt has no such source.
apt_repo() {
	local codename=$1
	apt-get indextargets --format '$(REPO_URI) $(CODENAME) $(ORIGIN) $(COMPONENT)' \
		'Identifier: Packages' 2>/dev/null \
		| awk -v c="$codename" '$2 == c && $3 == "Debian" && $4 == "main" { print $1; exit }'
}

# A mirror a container can use as well as this machine: http(s) on a host
# that is not this machine's loopback.
check_mirror() {
	local uri=$1 what=$2
	case "$uri" in
	http://* | https://*) ;;
	*) die "$what $uri: a container can only use an http(s) mirror; set DEBIAN_MIRROR" ;;
	esac
	local host=${uri#*://}
	host=${host%%/*}
	host=${host##*@}
	host=${host%:*}
	case "$host" in
	localhost | 127.* | \[::1\] | ::1)
		die "$what $uri is on this machine's loopback, which a container does not" \
			"reach; set DEBIAN_MIRROR to an address containers reach"
		;;
	esac
}

# The mirror for debootstrap, and the sources the image gets: Debian's
# suite, its updates and its security suite, each from where this machine's
# apt takes it.
read_mirrors() {
	command -v apt-get >/dev/null || [ -n "${DEBIAN_MIRROR:-}" ] \
		|| die "this is not a Debian system (no apt-get): set DEBIAN_MIRROR to a" \
			"Debian mirror (like http://deb.debian.org/debian)"
	mirror=${DEBIAN_MIRROR:-$(apt_repo "$SUITE")}
	[ -n "$mirror" ] || die "apt has no source for Debian $SUITE main (apt-get indextargets" \
		"lists none; has 'apt-get update' run?). Set DEBIAN_MIRROR to a Debian mirror."
	check_mirror "$mirror" mirror
	updates=${DEBIAN_MIRROR:-$(apt_repo "$SUITE-updates")}
	security=$(apt_repo "$SUITE-security" || true)
	if [ -n "$security" ] && ! (check_mirror "$security" "security mirror") 2>/dev/null; then
		log "security mirror $security is not usable from a container: left out"
		security=
	fi
}

cmd_mirror() {
	read_mirrors
	echo "mirror:   $mirror ($SUITE)"
	echo "updates:  ${updates:-none} ($SUITE-updates)"
	echo "security: ${security:-none} ($SUITE-security)"
}

have_image() {
	docker image inspect "$1" >/dev/null 2>&1
}

# Pull $1; 0 if it worked. The reason it did not is printed.
try_pull() {
	local out
	if out=$(timeout 300 docker pull -q "$1" 2>&1); then
		log "pulled $1"
		return 0
	fi
	log "cannot pull $1: $(tail -n1 <<<"$out")"
	return 1
}

# How this machine's apt reaches its mirror, as apt.conf lines: whether it
# checks the Release files' dates (a frozen snapshot mirror serves Release
# files whose Valid-Until has passed) and its proxies, except those a
# container cannot reach (loopback) or that carry a password (an image layer
# is no place for one).
mirror_access() {
	local line
	apt-config dump 2>/dev/null | grep -E \
		'^Acquire::(Check-Valid-Until|Check-Date|(http|https|ftp)::Proxy(::[^ ]+)?) ' \
		| while IFS= read -r line; do
			case "$line" in
			*Proxy*localhost* | *Proxy*127.* | *Proxy*\[::1\]*)
				log "image apt: leaving out a loopback proxy ($line): containers do not reach it"
				;;
			*Proxy*://*@*)
				log "image apt: leaving out a proxy with a password: set it at build time"
				;;
			*) printf '%s\n' "$line" ;;
			esac
		done
}

# The apt sources of the image, deb822 as in Debian's own images.
image_sources() {
	local suites=$SUITE
	[ -n "$updates" ] && [ "$updates" = "$mirror" ] && suites="$suites $SUITE-updates"
	cat <<-EOF
	Types: deb
	URIs: $mirror
	Suites: $suites
	Components: main
	Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
	EOF
	if [ -n "$updates" ] && [ "$updates" != "$mirror" ]; then
		printf '\nTypes: deb\nURIs: %s\nSuites: %s-updates\nComponents: main\n' \
			"$updates" "$SUITE"
		printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
	fi
	if [ -n "$security" ]; then
		printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' \
			"$security" "$SUITE"
		printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
	fi
}

# (root) debootstrap into $1/root and make it what a container image is:
# Debian's sources, the apt settings of Debian's images, no host files, no
# caches.
root_tree() {
	local work=$1 root=$1/root
	read_mirrors
	if ! command -v debootstrap >/dev/null; then
		log "installing debootstrap (apt)"
		"$top/scripts/setup.sh" apt-docker-base
	fi
	# An https mirror needs the CA certificates in the image for its apt.
	local include=()
	case "$mirror" in https://*) include=(--include=ca-certificates) ;; esac
	log "debootstrap: Debian $SUITE (minbase) from $mirror (about half a minute)"
	debootstrap --variant=minbase "${include[@]}" "$SUITE" "$root" "$mirror" \
		>"$work/debootstrap.log" 2>&1 || {
		tail -n 20 "$work/debootstrap.log" >&2
		die "debootstrap of $SUITE from $mirror failed (log above)"
	}
	rm -f "$root/etc/apt/sources.list"
	image_sources > "$root/etc/apt/sources.list.d/debian.sources"
	local access
	access=$(mirror_access)
	if [ -n "$access" ]; then
		log "image apt: as this machine's apt reaches the mirror: $(tr '\n' ' ' <<<"$access")"
		{
			echo "// How the machine that built this image reaches its mirror (docker-base.sh)."
			echo "$access"
		} > "$root/etc/apt/apt.conf.d/50mirror-access"
	fi
	# As in Debian's images (debuerreotype): no services start in a build,
	# apt keeps no downloaded packages and no translations.
	printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
	chmod 755 "$root/usr/sbin/policy-rc.d"
	cat > "$root/etc/apt/apt.conf.d/docker-clean" <<-'EOF'
	DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
	APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
	Dir::Cache::pkgcache "";
	Dir::Cache::srcpkgcache "";
	EOF
	echo 'Acquire::Languages "none";' > "$root/etc/apt/apt.conf.d/docker-no-languages"
	echo 'Acquire::GzipIndexes "true";' > "$root/etc/apt/apt.conf.d/docker-gzip-indexes"
	printf 'APT::AutoRemove::SuggestsImportant "false";\n' \
		> "$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
	# The engine provides these per container; debootstrap copied the host's.
	rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
	: > "$root/etc/hosts"
	: > "$root/etc/machine-id"
	rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
		"$root"/var/cache/apt/archives/*.deb "$root"/tmp/* "$root"/var/tmp/*
	find "$root/var/log" -type f -exec truncate -s0 {} +
	# What the image was made from, for its label.
	echo "debootstrap --variant=minbase $SUITE $mirror" > "$work/how"
}

# (root) Remove from $1/root what Debian's slim images leave out, and keep
# dpkg from installing it.
root_slim() {
	local root=$1/root
	cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<-'EOF'
	# Slim image: no documentation, manual pages or translations.
	path-exclude /usr/share/doc/*
	path-include /usr/share/doc/*/copyright
	path-exclude /usr/share/man/*
	path-exclude /usr/share/groff/*
	path-exclude /usr/share/info/*
	path-exclude /usr/share/lintian/*
	path-exclude /usr/share/linda/*
	path-exclude /usr/share/locale/*
	EOF
	find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
	find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
	rm -rf "$root"/usr/share/man/* "$root"/usr/share/groff/* "$root"/usr/share/info/* \
		"$root"/usr/share/lintian/* "$root"/usr/share/linda/* "$root"/usr/share/locale/*
}

# (root) The tree $1/root as a tar stream on stdout.
root_tar() {
	tar --numeric-owner --xattrs -C "$1/root" -c .
}

# (root) Remove the work directory $1.
root_rm() {
	case "$1" in
	*/docker-base.*) rm -rf --one-file-system "$1" ;;
	*) die "refusing to remove $1" ;;
	esac
}

# Import the tree in $1 as image $2 ($3 says how it was made).
import_tree() {
	local work=$1 tag=$2 how=$3
	log "import: $tag"
	as_root --root-tar "$work" | docker import \
		--change 'CMD ["bash"]' \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change "LABEL io.asterisk-marks.base=\"$how\"" \
		--change "LABEL io.asterisk-marks.created=$(date -u +%FT%TZ)" \
		- "$tag" >/dev/null || die "docker import of $tag failed"
}

# debootstrap Debian and import it as the tags asked for ($1: the full
# image, $2: the slim one; yes or no).
build_images() {
	local want_full=$1 want_slim=$2 work
	work=$(mktemp -d "${TMPDIR:-/var/tmp}/docker-base.XXXXXX")
	# shellcheck disable=SC2064 # expand $work now
	trap "as_root --root-rm '$work' || true" EXIT
	as_root --root-tree "$work"
	local how
	how=$(cat "$work/how")
	[ "$want_full" = yes ] && import_tree "$work" "$image" "$how"
	if [ "$want_slim" = yes ]; then
		as_root --root-slim "$work"
		import_tree "$work" "$slim_image" "$how, slim"
	fi
	as_root --root-rm "$work"
	trap - EXIT
}

main() {
	local cmd=${1:-ensure} full=no slim=no
	case "$cmd" in
	mirror)
		cmd_mirror
		return
		;;
	# Internal: the steps that run as root (see as_root).
	--root-tree) root_tree "$2"; return ;;
	--root-slim) root_slim "$2"; return ;;
	--root-tar) root_tar "$2"; return ;;
	--root-rm) root_rm "$2"; return ;;
	--rebuild)
		docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info'"
		full=yes slim=yes
		;;
	ensure)
		docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info'"
		have_image "$image" || try_pull "$image" || full=yes
		have_image "$slim_image" || try_pull "$slim_image" || slim=yes
		if [ $full = no ] && [ $slim = no ]; then
			log "$image and $slim_image are present"
			return 0
		fi
		log "no registry gave them: building from Debian's archive with debootstrap"
		;;
	*) die "usage: docker-base.sh [--rebuild|mirror]" ;;
	esac
	build_images "$full" "$slim"
	local tag
	for tag in "$image" "$slim_image"; do
		log "$tag: $(docker image inspect -f '{{index .Config.Labels "io.asterisk-marks.base"}}' \
			"$tag" | sed 's/<no value>/from a registry/'), $(docker image inspect \
			-f '{{.Size}}' "$tag" | numfmt --to=iec)"
	done
}

main "$@"
