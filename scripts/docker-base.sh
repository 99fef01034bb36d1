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
# debootstrap runs as root: as another user the script asks sudo for it.
set -euo pipefail

readonly SUITE=bookworm
image=${DEBIAN_IMAGE:-debian:$SUITE}
slim_image=${DEBIAN_SLIM_IMAGE:-debian:$SUITE-slim}
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
started=$SECONDS

log() {
	local t=$((SECONDS - started))
	printf '[docker-base %02d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*" >&2
}

die() {
	printf 'docker-base: error: %s\n' "$*" >&2
	exit 1
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

# The mirror for debootstrap, and the sources the image gets: Debian's
# suite, its updates and its security suite, each from where this machine's
# apt takes it.
read_mirrors() {
	command -v apt-get >/dev/null || die "this is not a Debian system (no apt-get):" \
		"set DEBIAN_MIRROR to a Debian mirror (like http://deb.debian.org/debian)"
	mirror=${DEBIAN_MIRROR:-$(apt_repo "$SUITE")}
	[ -n "$mirror" ] || die "apt has no source for Debian $SUITE main (apt-get indextargets" \
		"lists none; has 'apt-get update' run?). Set DEBIAN_MIRROR to a Debian mirror."
	updates=${DEBIAN_MIRROR:-$(apt_repo "$SUITE-updates")}
	security=$(apt_repo "$SUITE-security")
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
	if out=$(docker pull -q "$1" 2>&1); then
		log "pulled $1"
		return 0
	fi
	log "cannot pull $1: $(tail -n1 <<<"$out")"
	return 1
}

# How this machine's apt reaches its mirror, as apt.conf lines: its proxies
# and whether it checks the Release files' dates (a frozen snapshot mirror
# serves Release files whose Valid-Until has passed). The image's apt needs
# the same to reach the same mirror.
mirror_access() {
	apt-config dump 2>/dev/null | grep -E \
		'^Acquire::(Check-Valid-Until|Check-Date|(http|https|ftp)::Proxy(::[^ ]+)?) ' || true
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

# Make the debootstrapped tree $1 what a container image is: Debian's
# sources, the apt settings of Debian's images, no host files, no caches.
containerize() {
	local root=$1
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
}

# Remove what Debian's slim images leave out, and keep dpkg from installing it.
slimify() {
	local root=$1
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

# Import the tree $1 as image $2 ($3 says how it was made).
import_tree() {
	local root=$1 tag=$2 what=$3
	log "import: $tag"
	tar --numeric-owner --xattrs -C "$root" -c . | docker import \
		--change 'CMD ["bash"]' \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change "LABEL io.asterisk-marks.base=\"$what\"" \
		--change "LABEL io.asterisk-marks.created=$(date -u +%FT%TZ)" \
		- "$tag" >/dev/null || die "docker import of $tag failed"
}

# debootstrap Debian and import it as every tag named (the full image, the
# slim one, or both).
build_images() {
	local want_full=$1 want_slim=$2
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || die "debootstrap needs root: run this as root"
		log "debootstrap needs root: asking sudo"
		exec sudo --preserve-env=DEBIAN_IMAGE,DEBIAN_SLIM_IMAGE,DEBIAN_MIRROR,TMPDIR,DOCKER_HOST \
			"$0" --only "$want_full" "$want_slim"
	fi
	read_mirrors
	if ! command -v debootstrap >/dev/null; then
		log "installing debootstrap (apt)"
		"$top/scripts/setup.sh" apt-docker-base
	fi
	local work
	work=$(mktemp -d "${TMPDIR:-/var/tmp}/docker-base.XXXXXX")
	# shellcheck disable=SC2064 # expand $work now
	trap "rm -rf '$work'" EXIT
	log "debootstrap: Debian $SUITE (minbase) from $mirror (about half a minute)"
	debootstrap --variant=minbase "$SUITE" "$work/root" "$mirror" \
		>"$work/debootstrap.log" 2>&1 || {
		tail -n 20 "$work/debootstrap.log" >&2
		die "debootstrap of $SUITE from $mirror failed (log above)"
	}
	containerize "$work/root"
	local how="debootstrap --variant=minbase $SUITE $mirror"
	[ "$want_full" = yes ] && import_tree "$work/root" "$image" "$how"
	if [ "$want_slim" = yes ]; then
		slimify "$work/root"
		import_tree "$work/root" "$slim_image" "$how, slim"
	fi
	rm -rf "$work"
	trap - EXIT
}

main() {
	local cmd=${1:-ensure} full=no slim=no
	case "$cmd" in
	mirror)
		cmd_mirror
		return
		;;
	--only) # internal: after sudo, build what the caller found missing
		full=$2 slim=$3
		;;
	--rebuild) full=yes slim=yes ;;
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
			"$tag" 2>/dev/null || echo '?'), $(docker image inspect -f '{{.Size}}' "$tag" \
			| numfmt --to=iec)"
	done
}

main "$@"
