#!/usr/bin/env bash
# Build Asterisk from Debian's pinned source package, with (or without) the
# patch series in asterisk-patch/, and install it into a cached prefix.
#
# The one build recipe of the project: the Makefile and docker/Dockerfile both
# call this script.
#
#   asterisk-build.sh fetch           download the pinned source into the cache
#   asterisk-build.sh check-patches   apply the series to a pristine tree, no build
#   asterisk-build.sh build           build with the series -> build/asterisk
#   asterisk-build.sh build-upstream  build without it     -> build/asterisk-upstream
#   asterisk-build.sh devcheck        compile chan_websocket.c with dev-mode flags
#   asterisk-build.sh devcheck-pulls  the same for each pull request the series does not build
#   asterisk-build.sh pr-series NAME DIR  a pull request with what it needs, as a series in DIR
#   asterisk-build.sh key [upstream]  print the cache key of a build
#
# Environment:
#   ASTERISK_MARKS_CACHE   cache directory (default ~/.cache/asterisk-marks)
#   ASTERISK_BUILD_JOBS    parallel make jobs (default: number of cores)
#   ASTERISK_PROFILE       the modules: "test" (default; what the harness loads,
#                          a short build) or "deployment" (what a voice-bot
#                          deployment uses: ARI, Stasis, bridges, PJSIP, codecs,
#                          formats, playback; the Docker image's). Own cache key;
#                          a deployment build links as build/asterisk-deployment.
#   ASTERISK_SANITIZE      "address" builds with AddressSanitizer (own cache key)
#   ASTERISK_INSTALL_LINK  where to link the install (default build/ in the
#                          checkout; build/<version>/ for another source)
#   ASTERISK_DESTDIR       install here too (a plain copy; used by docker/)
#   ASTERISK_PATCH_DIR     the patch series directory (default: asterisk-patch/22.10/
#                          for the Debian source, asterisk-patch/ for the others)
#   ASTERISK_DEBIAN_MIRROR the Debian mirror with unstable's sources
#                          (default http://deb.debian.org/debian)
#   ASTERISK_MARKS_CA_BUNDLE  a CA bundle the downloads trust (apt, curl): for
#                          a network whose TLS a proxy intercepts
#
# The source (default: Debian's pinned source package, below):
#   ASTERISK_SOURCE        "debian" (default), "tarball" (an upstream release),
#                          "snapshot" (a `git archive` tarball of upstream, like
#                          the master snapshot in ../shared/upstream) or "tree"
#                          (an Asterisk source tree of yours: a clone or an
#                          unpacked release)
#   ASTERISK_SNAPSHOT      for "snapshot": the .tar.xz/.tar.gz; verified by
#   ASTERISK_SNAPSHOT_SHA256  its sha256 (default: the .sha256 file beside it)
#   ASTERISK_TREE          for "tree": its top directory (tracked files of a git
#                          clone, with their uncommitted changes; all files
#                          otherwise)
#   ASTERISK_VERSION       the Asterisk version (default: the pinned one, 22.10.1)
#   ASTERISK_TARBALL_URL   where the release tarball is (default: downloads.asterisk.org)
#   ASTERISK_TARBALL_SHA256  its sha256 (required for "tarball"; the release's
#                          .sha256 file has it)
set -euo pipefail

# The pinned source: Debian unstable's asterisk source package.
readonly DEB_PACKAGE=asterisk
readonly DEB_VERSION='1:22.10.1+dfsg+~cs6.17.60671434-1'
readonly DEB_SUITE=unstable
readonly DEB_MIRROR=${ASTERISK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
readonly DSC_SHA256=8799652c4e2fc4bb4d6610b0f7144a9945bcff847d0185fb10fca20de0533eb2
# Nominal install prefix compiled into the binary. The harness always passes
# its own asterisk.conf, so where the tree is really installed does not matter.
readonly PREFIX=/opt/asterisk-marks

# Profile "test": the modules the harness and upstream's websocket tests
# need; everything else is left out to keep builds short.
readonly TEST_MODULES=(
	app_dial app_echo pbx_config
	bridge_simple bridge_native_rtp bridge_builtin_features
	chan_pjsip chan_websocket
	codec_ulaw codec_alaw codec_resample
	func_channel func_strings
	res_http_websocket res_websocket_client res_timing_timerfd
	res_pjproject res_pjsip res_pjsip_session res_pjsip_sdp_rtp
	res_pjsip_endpoint_identifier_user res_pjsip_endpoint_identifier_ip
	res_pjsip_header_funcs res_pjsip_logger res_pjsip_authenticator_digest
	res_pjsip_caller_id res_pjsip_pubsub res_pjsip_outbound_authenticator_digest
	res_rtp_asterisk res_sorcery_config res_sorcery_memory res_sorcery_astdb
	res_sorcery_realtime res_crypto res_format_attr_opus
	# ARI and Stasis: the externalMedia topologies (harness.topology) and
	# upstream's testsuite (make upstream-testsuite, which also uses CLI
	# originate); a mixing bridge, a prompt, and Gosub with UserEvent (a
	# pre-dial handler tells the rig a WebSocket/INCOMING channel's
	# connection id)
	'res_ari*' 'res_stasis*' app_stasis res_clioriginate
	bridge_softmix app_playback app_stack app_userevent
)
# Profile "deployment": what a voice-bot deployment uses. Patterns are
# matched against the source's own module list (menuselect), so the profile
# follows the source; a module a pattern matches whose libraries are missing
# is left out and named in the log. A module named without a pattern must
# build, or the build stops.
readonly DEPLOYMENT_MODULES=(
	"${TEST_MODULES[@]}"
	# Applications a dialplan or an ARI app uses around a bot
	app_controlplayback app_record app_mixmonitor app_senddtmf app_read
	app_originate app_bridgewait app_bridgeaddchan app_chanspy app_confbridge app_exec
	app_transfer app_blind_transfer app_attended_transfer app_softhangup
	app_verbose app_dumpchan app_milliwatt app_playtones app_talkdetect
	app_waitforsilence app_waituntil app_if app_while app_db app_sendtext app_cdr
	app_audiosocket app_channelredirect app_system
	# Channels and bridges
	chan_rtp chan_audiosocket chan_bridge_media 'bridge_*'
	# SIP: the whole PJSIP family (registrar, outbound registration, NAT, ...)
	'res_pjsip*'
	# Media: codecs, file formats, format attributes, music on hold
	'codec_*' 'format_*' 'res_format_attr_*' res_musiconhold res_rtp_multicast
	# Dialplan functions, call files, CLI originate, CDR
	'func_*' pbx_spool res_clioriginate res_agi res_speech res_audiosocket
	res_mutestream res_timing_pthread res_stun_monitor res_security_log
	res_endpoint_stats res_convert res_limit res_manager_devicestate
	res_sorcery_memory_cache
)
# Never matched by a pattern: Debian's source removes the bundled iLBC code
# (Debian builds codec_ilbc against libilbc, which Debian 12 lacks); phone
# provisioning is for desk phones, not bots.
readonly PATTERN_EXCLUDES=(codec_ilbc res_pjsip_phoneprov_provider)
readonly CONFIGURE_FLAGS=(
	--prefix="$PREFIX"
	--with-pjproject-bundled
	--without-dahdi --without-pri --without-ss7 --without-openr2
	--without-sdl --without-jack --without-portaudio --without-bluetooth
)

readonly PINNED_VERSION=22.10.1
readonly TARBALL_BASE=https://downloads.asterisk.org/pub/telephony/asterisk/releases

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source_kind=${ASTERISK_SOURCE:-debian}
snapshot=${ASTERISK_SNAPSHOT:-}
snapshot_sha=${ASTERISK_SNAPSHOT_SHA256:-}
tree_src=${ASTERISK_TREE:-}
# What a "tree" or "snapshot" source is, once checked (check_source).
upstream_id=
version=${ASTERISK_VERSION:-$PINNED_VERSION}
tarball_sha=${ASTERISK_TARBALL_SHA256:-}
tarball_url=${ASTERISK_TARBALL_URL:-$TARBALL_BASE/asterisk-$version.tar.gz}
cache=${ASTERISK_MARKS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/asterisk-marks}
jobs=${ASTERISK_BUILD_JOBS:-$(nproc)}
sanitize=${ASTERISK_SANITIZE:-}
profile=${ASTERISK_PROFILE:-test}
case "$profile" in
test) MODULES=("${TEST_MODULES[@]}") ;;
deployment) MODULES=("${DEPLOYMENT_MODULES[@]}") ;;
*)
	printf 'asterisk-build: error: ASTERISK_PROFILE=%s: expected "test" or "deployment"\n' \
		"$profile" >&2
	exit 1
	;;
esac
readonly MODULES
link_dir=${ASTERISK_INSTALL_LINK:-$top/build}
# The series for the source: Debian's 22.10.1 has its own (it predates
# upstream's fix for #2006); master, its snapshots and 22.11+ take the main one.
if [ "$source_kind" = debian ]; then
	patch_dir=${ASTERISK_PATCH_DIR:-$top/asterisk-patch/22.10}
else
	patch_dir=${ASTERISK_PATCH_DIR:-$top/asterisk-patch}
fi
series=$patch_dir/series
started=$SECONDS

log() {
	local t=$((SECONDS - started))
	printf '[asterisk-build %02d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*" >&2
}

die() {
	printf 'asterisk-build: error: %s\n' "$*" >&2
	exit 1
}

need_tools() {
	local missing=() tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	die "missing tools: ${missing[*]}. Run 'make setup' (as root) or install them:" \
		"apt-get install build-essential dpkg-dev git bzip2 patch xz-utils" \
		"libedit-dev libjansson-dev libxml2-dev libsqlite3-dev uuid-dev libssl-dev" \
		"libncurses-dev pkg-config"
}

# The patch files named by the series, in order.
series_patches() {
	[ -f "$series" ] || die "no series file at $series"
	sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$series"
}

# Which source to build; stops with the way out if it cannot be built.
check_source() {
	case "$source_kind" in
	debian)
		[ "$version" = "$PINNED_VERSION" ] || die "Asterisk $version: the Debian source" \
			"pinned here is $PINNED_VERSION ($DEB_VERSION). Build another release from" \
			"its upstream tarball: ASTERISK_SOURCE=tarball ASTERISK_VERSION=$version" \
			"ASTERISK_TARBALL_SHA256=<the sha256 in asterisk-$version.sha256>"
		;;
	tarball)
		[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+(-rc[0-9]+)?$ ]] || die "ASTERISK_VERSION='$version'" \
			"is not an Asterisk release number (like 22.10.1 or 23.0.0-rc1)"
		[[ $tarball_sha =~ ^[0-9a-f]{64}$ ]] || die "ASTERISK_SOURCE=tarball needs" \
			"ASTERISK_TARBALL_SHA256 (64 hex digits; the release's asterisk-$version.sha256" \
			"file has it): a tarball is never built unverified"
		;;
	snapshot) check_snapshot ;;
	tree) check_tree ;;
	*) die "ASTERISK_SOURCE='$source_kind': expected 'debian', 'tarball', 'snapshot' or 'tree'" ;;
	esac
}

# A snapshot tarball, verified by its sha256; its id names the commit.
check_snapshot() {
	[ -n "$snapshot" ] || die "ASTERISK_SOURCE=snapshot needs ASTERISK_SNAPSHOT (a git" \
		"archive tarball of Asterisk, like ../shared/upstream/asterisk-master-*.tar.xz)"
	[ -f "$snapshot" ] || die "ASTERISK_SNAPSHOT=$snapshot: no such file"
	if [ -z "$snapshot_sha" ] && [ -f "$snapshot.sha256" ]; then
		snapshot_sha=$(awk '{ print $1; exit }' "$snapshot.sha256")
	fi
	[[ $snapshot_sha =~ ^[0-9a-f]{64}$ ]] || die "ASTERISK_SNAPSHOT=$snapshot: no sha256" \
		"(ASTERISK_SNAPSHOT_SHA256, or a $(basename "$snapshot").sha256 file beside it):" \
		"a snapshot is never built unverified"
	local got
	got=$(sha256sum "$snapshot" | cut -d' ' -f1)
	[ "$got" = "$snapshot_sha" ] || die "checksum mismatch for $snapshot: expected sha256" \
		"$snapshot_sha, got $got. Nothing was built."
	local commit
	commit=$( (xz -dcf "$snapshot" 2>/dev/null || gzip -dcf "$snapshot") | git get-tar-commit-id \
		2>/dev/null || true)
	version=snapshot-${commit:0:10}
	[ -n "$commit" ] || version=snapshot-${snapshot_sha:0:10}
	upstream_id="$(basename "$snapshot") sha256:$snapshot_sha"
}

# A source tree of the user's; its id is its content (a git clone: the
# commit, the index and the uncommitted changes of tracked files).
check_tree() {
	[ -n "$tree_src" ] || die "ASTERISK_SOURCE=tree needs ASTERISK_TREE (the top directory" \
		"of an Asterisk source tree)"
	[ -d "$tree_src" ] || die "ASTERISK_TREE=$tree_src: no such directory"
	tree_src=$(cd "$tree_src" && pwd)
	[ -f "$tree_src/channels/chan_websocket.c" ] && [ -f "$tree_src/configure" ] \
		|| die "ASTERISK_TREE=$tree_src is not an Asterisk source tree with chan_websocket" \
			"(channels/chan_websocket.c and configure; chan_websocket arrived in 22.5.0)"
	local content
	if tree_is_git; then
		content=$({
			git -C "$tree_src" rev-parse HEAD 2>/dev/null || true
			git -C "$tree_src" ls-files -s
			git -C "$tree_src" diff
		} | sha256sum | cut -c1-16)
		version=tree-$(git -C "$tree_src" rev-parse --short=10 HEAD 2>/dev/null || echo new)
	else
		content=$(tar -C "$tree_src" --sort=name --exclude=.git -cf - . | sha256sum | cut -c1-16)
		version=tree-$content
	fi
	upstream_id="tree $tree_src content:$content"
}

# What identifies the source in cache keys and in the install's VERSION file.
source_id() {
	case "$source_kind" in
	tarball) echo "asterisk-$version.tar.gz sha256:$tarball_sha" ;;
	snapshot | tree) echo "$upstream_id" ;;
	*) echo "$DEB_VERSION" ;;
	esac
}

# Cache key: the source, the build recipe, the options and, unless
# building upstream, the content of every patch in the series.
build_key() {
	local flavour=$1
	{
		source_id
		echo "flavour=$flavour sanitize=$sanitize profile=$profile"
		echo "${CONFIGURE_FLAGS[*]}"
		echo "${MODULES[*]}"
		build_packages_id
		sha256sum "$top/scripts/asterisk-build.sh" | cut -d' ' -f1
		if [ "$flavour" = patched ]; then
			local p
			while read -r p; do
				echo "$p"
				sha256sum "$patch_dir/$p" | cut -d' ' -f1
			done < <(series_patches)
		fi
	} | sha256sum | cut -c1-16
}

# --- source ------------------------------------------------------------------

apt_env() {
	local aptdir=$cache/apt
	mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
	cat > "$aptdir/sources.list" <<-EOF
	deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEB_MIRROR $DEB_SUITE main
	EOF
	cat > "$aptdir/apt.conf" <<-EOF
	Dir::Etc::SourceList "$aptdir/sources.list";
	Dir::Etc::SourceParts "/dev/null";
	Dir::State::Lists "$aptdir/lists";
	Dir::Cache "$aptdir";
	Dir::Cache::archives "$aptdir/archives";
	APT::Sandbox::User "root";
	EOF
	if [ -n "${ASTERISK_MARKS_CA_BUNDLE:-}" ]; then
		echo "Acquire::https::CAInfo \"$ASTERISK_MARKS_CA_BUNDLE\";" >> "$aptdir/apt.conf"
	fi
	export APT_CONFIG=$aptdir/apt.conf
}

fetch() {
	local dl=$cache/source/${DEB_VERSION//:/_}
	local dsc_name=${DEB_PACKAGE}_${DEB_VERSION#*:}.dsc
	if [ -f "$dl/.complete" ]; then
		echo "$dl/$dsc_name"
		return 0
	fi
	need_tools apt-get apt-cache dpkg-source sha256sum
	[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] \
		|| die "Debian's archive keyring is missing: apt-get install debian-archive-keyring"
	apt_env
	log "fetch: reading Debian $DEB_SUITE's source index"
	if ! apt-get -q update >"$cache/apt/update.log" 2>&1; then
		cat "$cache/apt/update.log" >&2
		die "cannot reach Debian's archive ($DEB_MIRROR $DEB_SUITE); check the" \
			"network or proxy settings, then run again"
	fi
	local served
	served=$(apt-cache showsrc "$DEB_PACKAGE" 2>/dev/null | sed -n 's/^Version: //p' | sort -u)
	if ! grep -qxF "$DEB_VERSION" <<<"$served"; then
		die "Debian $DEB_SUITE no longer serves $DEB_PACKAGE $DEB_VERSION; it serves" \
			"${served:-nothing}. Update DEB_VERSION (and DSC_SHA256) in" \
			"scripts/asterisk-build.sh and check that the patch series still applies."
	fi
	rm -rf "$dl.tmp"
	mkdir -p "$dl.tmp"
	log "fetch: downloading $DEB_PACKAGE $DEB_VERSION"
	(cd "$dl.tmp" && apt-get -q source --download-only "$DEB_PACKAGE=$DEB_VERSION") \
		>"$cache/apt/source.log" 2>&1 || {
		cat "$cache/apt/source.log" >&2
		die "apt-get source failed"
	}
	echo "$DSC_SHA256  $dl.tmp/$dsc_name" | sha256sum --quiet -c - \
		|| die "checksum mismatch for $dsc_name (expected sha256 $DSC_SHA256)"
	touch "$dl.tmp/.complete"
	rm -rf "$dl"
	mv "$dl.tmp" "$dl"
	echo "$dl/$dsc_name"
}

# Download and verify an upstream release tarball; print its path.
fetch_tarball() {
	local dl=$cache/source/tarball-$version-${tarball_sha:0:12}
	local file=$dl/asterisk-$version.tar.gz
	if [ -f "$dl/.complete" ]; then
		echo "$file"
		return 0
	fi
	need_tools curl sha256sum tar
	rm -rf "$dl.tmp"
	mkdir -p "$dl.tmp"
	log "fetch: downloading $tarball_url"
	local ca=()
	[ -n "${ASTERISK_MARKS_CA_BUNDLE:-}" ] && ca=(--cacert "$ASTERISK_MARKS_CA_BUNDLE")
	curl -fsSL --retry 2 "${ca[@]}" -o "$dl.tmp/asterisk-$version.tar.gz" "$tarball_url" \
		2>"$dl.tmp/curl.log" || {
		cat "$dl.tmp/curl.log" >&2
		die "cannot download Asterisk $version from $tarball_url: is $version a released" \
			"version (see $TARBALL_BASE/), and is the network up?"
	}
	local got
	got=$(sha256sum "$dl.tmp/asterisk-$version.tar.gz" | cut -d' ' -f1)
	[ "$got" = "$tarball_sha" ] || die "checksum mismatch for asterisk-$version.tar.gz from" \
		"$tarball_url: expected sha256 $tarball_sha, got $got. Nothing was built."
	touch "$dl.tmp/.complete"
	rm -rf "$dl"
	mv "$dl.tmp" "$dl"
	echo "$file"
}

# Unpack the source into $1: the tarball as it is (its configure downloads
# pjproject), or Debian's package via unpack_debian.
unpack() {
	local dest=$1 tarball
	case "$source_kind" in
	debian)
		unpack_debian "$dest"
		return
		;;
	snapshot | tree)
		unpack_upstream "$dest"
		return
		;;
	esac
	tarball=$(fetch_tarball)
	rm -rf "$dest"
	mkdir -p "$dest"
	log "unpack: $(basename "$tarball")"
	tar -xzf "$tarball" -C "$dest" --strip-components=1 \
		|| die "$tarball is not a readable tar.gz"
	[ -f "$dest/channels/chan_websocket.c" ] \
		|| die "asterisk-$version has no channels/chan_websocket.c (it arrived in 22.5.0)"
}

# Whether the "tree" source is the top of a git clone.
tree_is_git() {
	git -C "$tree_src" rev-parse --show-toplevel 2>/dev/null | grep -qxF "$tree_src"
}

# The files of a snapshot or a tree of the user's into the new directory $1.
upstream_files() {
	local dest=$1
	rm -rf "$dest"
	mkdir -p "$dest"
	if [ "$source_kind" = snapshot ]; then
		log "unpack: $(basename "$snapshot")"
		tar -xaf "$snapshot" -C "$dest" --strip-components=1 \
			|| die "$snapshot is not a readable tarball"
	elif tree_is_git; then
		log "copy: the tracked files of $tree_src (with their uncommitted changes)"
		(cd "$tree_src" && git ls-files -z | tar --null -T - -cf -) | tar -C "$dest" -xf -
	else
		log "copy: $tree_src"
		tar -C "$tree_src" --exclude=.git -cf - . | tar -C "$dest" -xf -
	fi
	[ -f "$dest/channels/chan_websocket.c" ] \
		|| die "$(source_id) has no channels/chan_websocket.c (it arrived in 22.5.0)"
}

# A snapshot or a tree of the user's into $1, with a .version file, and
# with the pjproject its build bundles ready offline.
unpack_upstream() {
	local dest=$1
	upstream_files "$dest"
	[ -f "$dest/.version" ] || echo "$version" > "$dest/.version"
	offline_pjproject "$dest"
}

# The bundled pjproject's tarball for the tree in $1, without GitHub: the
# build's download cache gets the one Debian's source carries (as
# debian/rules does), if it is the version the tree wants.
offline_pjproject() {
	local tree=$1 want
	want=$(sed -n 's/^PJPROJECT_VERSION=//p' "$tree/third-party/versions.mak" 2>/dev/null)
	[ -n "$want" ] || return 0
	local externals=$cache/externals name=pjproject-$want.tar.bz2
	mkdir -p "$externals"
	if [ ! -f "$externals/$name" ]; then
		log "pjproject $want: taken from Debian's source package (offline, as debian/rules does)"
		local tmp have
		tmp=$(mktemp -d "$cache/pjproject.XXXXXX")
		(unpack_debian "$tmp/src") || { rm -rf "$tmp"; exit 1; }
		have=$(find "$tmp/src/debian/build-pjproject" -name 'pjproject-*.tar.bz2' -printf '%f\n')
		if [ "$have" != "$name" ]; then
			rm -rf "$tmp"
			die "this tree bundles pjproject $want; Debian's source has ${have:-none}. Put" \
				"$name (from pjproject's releases) in $externals and run again"
		fi
		mv "$tmp/src/debian/build-pjproject/$name" "$externals/$name.tmp"
		mv "$externals/$name.tmp" "$externals/$name"
		rm -rf "$tmp"
	fi
	(cd "$externals" && md5sum "$name") > "$tree/third-party/pjproject/$name.md5"
}

# Unpack the pinned source (Debian's patches applied) into $1, with the
# bundled pjproject prepared the way debian/rules does it.
unpack_debian() {
	local dest=$1 dsc
	dsc=$(fetch)
	rm -rf "$dest"
	log "unpack: dpkg-source -x (applies Debian's patches)"
	# The .dsc's checksum was verified at download; gpgv's note that it
	# lacks the uploader's key is noise, so the output goes to a log.
	local unpack_log=$cache/unpack.log
	dpkg-source -x "$dsc" "$dest" >"$unpack_log" 2>&1 || {
		cat "$unpack_log" >&2
		die "dpkg-source -x $dsc failed"
	}
	local pjver
	pjver=$(
		cd "$dest/Xpjproject" && grep -Po '^export PJ_VERSION_(MAJOR|MINOR|REV)\s+:=\s+\K\d+' version.mak \
			| paste -sd.
	)
	[ -n "$pjver" ] || die "cannot read the pjproject version from Xpjproject/version.mak"
	local pjdir=$dest/debian/build-pjproject
	mkdir -p "$pjdir"
	ln -s ../../Xpjproject "$pjdir/pjproject-$pjver"
	(cd "$pjdir" && tar --create --dereference "pjproject-$pjver" | bzip2 --fast > "pjproject-$pjver.tar.bz2")
	(cd "$pjdir" && md5sum "pjproject-$pjver.tar.bz2") > "$dest/third-party/pjproject/pjproject-$pjver.tar.bz2.md5"
	rm "$pjdir/pjproject-$pjver"
}

# Apply the series to the tree in $1; on failure name the patch and the hunk.
apply_series() {
	local tree=$1 p n=0
	while read -r p; do
		n=$((n + 1))
		[ -f "$patch_dir/$p" ] || die "series names $p, which is not in $patch_dir"
		local out
		if ! out=$(cd "$tree" && git apply --check --verbose "$patch_dir/$p" 2>&1); then
			printf '%s\n' "$out" | grep -E '^error: (patch failed|.*: patch does not apply)' >&2
			local hunk
			hunk=$(printf '%s\n' "$out" | grep -m1 '^error: patch failed:' \
				| sed 's/^error: patch failed: //')
			die "patch $n ($p) does not apply${hunk:+: hunk at $hunk fails}"
		fi
		# --index, so that a later reset to pristine also removes new files.
		(cd "$tree" && git apply --index "$patch_dir/$p")
		log "patch: applied $p"
	done < <(series_patches)
	return 0
}

# The patch file of the series whose name starts with the number $1, or $1
# itself when it is a path in the series directory (a pull request's own
# version of a patch, made to apply without the patches below it).
patch_numbered() {
	local f
	if [[ $1 == */* ]]; then
		[ -f "$patch_dir/$1" ] || die "pull-requests names $1, which is not in $patch_dir"
		printf '%s\n' "$1"
		return
	fi
	f=$(series_patches | grep -m1 "^$1-") || die "pull-requests names patch $1, which the series has not"
	printf '%s\n' "$f"
}

# The pull requests of $patch_dir/pull-requests, one a line: its name, its
# own patches and the patches it needs below it, separated by '|'.
pull_requests() {
	local manifest=$patch_dir/pull-requests line name own after
	while read -r line; do
		name=${line%%:*}
		line=${line#*:}
		own=$(xargs <<<"${line%%after*}")
		after=
		[[ $line == *after* ]] && after=$(xargs <<<"${line#*after}")
		printf '%s|%s|%s\n' "$name" "$own" "$after"
	done < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$manifest")
}

# Apply a pull request ($2: its patches, $3: those below it) to the tree in $1.
apply_pull_request() {
	local tree=$1 own=$2 after=$3 name=$4 n p
	for n in $after $own; do
		p=$(patch_numbered "$n")
		(cd "$tree" && git apply --index "$patch_dir/$p" 2>/dev/null) \
			|| die "pull request $name: patch $p does not apply${after:+ after $after}"
	done
}

# The pull request named $1 as a series of its own in the directory $2: the
# patches it names after "after", then its own, copied there with a series
# file listing them in that order, for ASTERISK_PATCH_DIR (make asterisk-pr).
pr_series() {
	local want=$1 out=$2 name own after n p found=
	[ -n "$want" ] && [ -n "$out" ] || die "pr-series: usage: pr-series NAME DIR"
	[ -f "$patch_dir/pull-requests" ] || die "pr-series: no pull-requests in $patch_dir"
	while IFS='|' read -r name own after; do
		[ "$name" = "$want" ] || continue
		found=1
		rm -rf "$out"
		mkdir -p "$out"
		for n in $after $own; do
			p=$(patch_numbered "$n")
			cp "$patch_dir/$p" "$out/"
			basename "$p" >>"$out/series"
		done
	done < <(pull_requests)
	[ -n "$found" ] || die "pr-series: no pull request named '$want' in $patch_dir/pull-requests" \
		"(one of: $(pull_requests | cut -d'|' -f1 | xargs))"
	log "pr-series: pull request $want as a series of $(wc -l <"$out/series") patches in $out"
}

# Each pull request of $patch_dir/pull-requests alone on the pristine tree in
# $1 (a git repository), with only the patches it names after "after" below it.
check_pull_requests() {
	local tree=$1 name own after alone=0 total=0
	[ -f "$patch_dir/pull-requests" ] || return 0
	while IFS='|' read -r name own after; do
		(cd "$tree" && git reset -q --hard && git clean -qfd)
		apply_pull_request "$tree" "$own" "$after" "$name"
		total=$((total + 1))
		if [ -z "$after" ]; then
			alone=$((alone + 1))
			log "check-patches: pull request $name ($own) applies alone"
		else
			log "check-patches: pull request $name ($own) applies after $after"
		fi
	done < <(pull_requests)
	log "check-patches: $total pull requests, $alone of them alone on $(source_id)"
}

check_patches() {
	need_tools git
	local tmp rc=0
	tmp=$(mktemp -d)
	if [[ $source_kind == @(snapshot|tree) ]]; then
		# Only the files, not the pjproject preparation: this must take seconds.
		upstream_files "$tmp/src"
	else
		unpack "$tmp/src"
	fi
	(cd "$tmp/src" && git init -q . && git add -A >/dev/null \
		&& git -c user.name=check -c user.email=check@localhost commit -qm pristine)
	(check_pull_requests "$tmp/src" && cd "$tmp/src" && git reset -q --hard && git clean -qfd) \
		|| rc=$?
	[ $rc -ne 0 ] || (apply_series "$tmp/src") || rc=$?
	rm -rf "$tmp"
	[ $rc -eq 0 ] || exit $rc
	log "check-patches: the series in $patch_dir ($(series_patches | wc -l) patches) applies" \
		"cleanly to $(source_id)"
}

# --- build -------------------------------------------------------------------

# The build tree is shared by every build flavour with the same options; it is
# a git repository whose first commit is the pristine source, so switching the
# patch series resets only the files that change and the build stays
# incremental.
tree_dir() {
	echo "$cache/tree-$(echo "$(source_id) ${CONFIGURE_FLAGS[*]} ${MODULES[*]}" \
		"${PATTERN_EXCLUDES[*]} $sanitize $(build_packages_id)" | sha256sum | cut -c1-12)"
}

# What configure finds depends on the libraries installed: the build
# packages scripts/setup.sh lists.
build_packages_id() {
	sed -n '/^readonly BUILD_PACKAGES=(/,/^)/p' "$top/scripts/setup.sh" 2>/dev/null \
		| sha256sum | cut -c1-12
}

# The module selection's inputs: a tree selected with other ones selects again.
selection_id() {
	{
		echo "${MODULES[*]} ${PATTERN_EXCLUDES[*]} $sanitize"
		declare -f select_modules
	} | sha256sum | cut -c1-16
}

prepare_tree() {
	local tree=$1
	if [ ! -f "$tree/.astmarks-configured" ]; then
		rm -rf "$tree"
		unpack "$tree"
		log "tree: recording the pristine source"
		(cd "$tree" && git init -q . && git add -A >/dev/null \
			&& git -c user.name=build -c user.email=build@localhost commit -qm pristine \
			&& git tag pristine)
		configure_tree "$tree"
		selection_id > "$tree/.astmarks-selection"
		touch "$tree/.astmarks-configured"
	elif [ "$(cat "$tree/.astmarks-selection" 2>/dev/null)" != "$(selection_id)" ]; then
		log "menuselect: the selection changed; selecting again"
		select_in "$tree"
		selection_id > "$tree/.astmarks-selection"
	fi
}

configure_tree() {
	local tree=$1 cflags='' ldflags=''
	if [ "$sanitize" = address ]; then
		cflags='-fsanitize=address -fno-omit-frame-pointer'
		ldflags='-fsanitize=address'
	fi
	# Debian's source carries pjproject; a tarball's build downloads it once.
	local externals=$cache/externals
	[ -d "$tree/debian/build-pjproject" ] && externals=$tree/debian/build-pjproject
	mkdir -p "$externals"
	log "configure: ./configure ${CONFIGURE_FLAGS[*]} (about a minute)"
	(cd "$tree" && CFLAGS="$cflags" LDFLAGS="$ldflags" \
		./configure "${CONFIGURE_FLAGS[@]}" --with-externals-cache="$externals") \
		>"$tree/configure.out" 2>&1 || {
		tail -n 40 "$tree/configure.out" >&2
		die "configure failed; the whole log is $tree/configure.out"
	}
	select_in "$tree"
}

select_in() {
	local tree=$1
	log "menuselect: profile $profile (${#MODULES[@]} names and patterns)"
	(cd "$tree" && select_modules) >"$tree/menuselect.out" 2>&1 || {
		grep -E '^error' "$tree/menuselect.out" >&2 || tail -n 40 "$tree/menuselect.out" >&2
		die "menuselect failed; see $tree/menuselect.out"
	}
	grep -E '^(left out|selected)' "$tree/menuselect.out" | while read -r line; do
		log "menuselect: $line"
	done
}

# In a configured tree: every category off, then the profile's modules on.
# A pattern's module whose libraries are missing is left out (and named); a
# module named without a pattern must build.
select_modules() {
	local opts=menuselect.makeopts ms=menuselect/menuselect
	make -s "$opts" || return 1
	local cat
	for cat in MENUSELECT_ADDONS MENUSELECT_APPS MENUSELECT_BRIDGES MENUSELECT_CDR \
		MENUSELECT_CEL MENUSELECT_CHANNELS MENUSELECT_CODECS MENUSELECT_FORMATS \
		MENUSELECT_FUNCS MENUSELECT_PBX MENUSELECT_RES MENUSELECT_TESTS \
		MENUSELECT_UTILS MENUSELECT_AGIS MENUSELECT_CORE_SOUNDS MENUSELECT_MOH \
		MENUSELECT_EXTRA_SOUNDS; do
		$ms --disable-category "$cat" "$opts" || return 1
	done
	$ms --disable BUILD_NATIVE "$opts" || return 1
	if [ "$sanitize" = address ]; then
		$ms --enable DONT_OPTIMIZE "$opts" || return 1
	fi
	# The source's modules (not add-ons, tests, utilities or sounds).
	local -A known=() named=() excluded=() wanted=() left=()
	local name pattern
	while read -r name; do
		known[$name]=1
	done < <(awk '
		/<category name=/ { split($0, a, "\""); cat = a[2] }
		/<member name=/ && cat ~ /^MENUSELECT_(APPS|BRIDGES|CDR|CEL|CHANNELS|CODECS|FORMATS|FUNCS|PBX|RES)$/ {
			split($0, a, "\""); print a[2]
		}' menuselect-tree)
	[ ${#known[@]} -gt 0 ] || { echo "error: no modules in menuselect-tree"; return 1; }
	for name in "${PATTERN_EXCLUDES[@]}"; do
		excluded[$name]=1
	done
	for pattern in "${MODULES[@]}"; do
		if [[ $pattern != *'*'* ]]; then
			[ -n "${known[$pattern]:-}" ] || {
				echo "error: the $profile profile names $pattern, which this source does not have"
				return 1
			}
			named[$pattern]=1 wanted[$pattern]=1
			continue
		fi
		for name in "${!known[@]}"; do
			# shellcheck disable=SC2053 # a glob on purpose
			[[ $name == $pattern ]] && [ -z "${excluded[$name]:-}" ] && wanted[$name]=1
		done
	done
	local args=()
	for name in "${!wanted[@]}"; do
		args+=(--enable "$name")
	done
	$ms "${args[@]}" "$opts" || return 1
	# Modules whose libraries are missing (menuselect's DEPSFAILED): a
	# pattern's are left out, a named one stops the build.
	while read -r name; do
		[ -n "${wanted[$name]:-}" ] || continue
		if [ -n "${named[$name]:-}" ]; then
			echo "error: $name is in the $profile profile but its libraries are missing"
			return 1
		fi
		left[$name]=1
		$ms --disable "$name" "$opts" || return 1
	done < <(sed -n 's/^MENUSELECT_DEPSFAILED=[A-Z_]*=//p' "$opts")
	$ms --check-deps "$opts" || return 1
	# What is selected now, checked against what was asked: menuselect
	# lists what it leaves out, one MENUSELECT_<category>= line each.
	local -A off=()
	for name in $(sed -n -E 's/^MENUSELECT_(APPS|BRIDGES|CDR|CEL|CHANNELS|CODECS|FORMATS|FUNCS|PBX|RES)=//p' "$opts"); do
		off[$name]=1
	done
	for name in "${!wanted[@]}"; do
		[ -z "${off[$name]:-}" ] && continue
		[ -n "${left[$name]:-}" ] && continue
		if [ -n "${named[$name]:-}" ]; then
			echo "error: menuselect did not select $name, which the $profile profile names"
			return 1
		fi
		left[$name]=1
	done
	[ ${#left[@]} -eq 0 ] || echo "left out (their libraries or dependencies are missing): $(printf '%s\n' "${!left[@]}" \
		| sort | tr '\n' ' ')"
	echo "selected $((${#wanted[@]} - ${#left[@]})) modules"
}

# Reset the tree to pristine and apply the series (when patched).
select_flavour() {
	local tree=$1 flavour=$2
	# Tracked files only: configure's and make's outputs are untracked and stay.
	(cd "$tree" && git reset -q --hard pristine)
	if [ "$flavour" = patched ]; then
		apply_series "$tree"
	fi
}

# Run make with its output in a log, printing progress while it runs.
run_make() {
	local tree=$1 what=$2
	shift 2
	local logf=$tree/make-$what.out
	(cd "$tree" && make -j"$jobs" "$@") >"$logf" 2>&1 &
	local pid=$! next=$((SECONDS + 15)) last=''
	while kill -0 "$pid" 2>/dev/null; do
		sleep 1
		if [ $SECONDS -ge $next ]; then
			next=$((SECONDS + 15))
			last=$(grep -Eo '\[(CC|LD|CXX)\][^>]*|Compiling [^ ]+' "$logf" 2>/dev/null \
				| tail -n1 | sed 's/  */ /g' || true)
			log "$what: still running (${last:-starting}; $(wc -l <"$logf") log lines)"
		fi
	done
	if ! wait "$pid"; then
		grep -n -B5 -A5 -E 'error:|Error [0-9]' "$logf" | tail -n 60 >&2 || tail -n 60 "$logf" >&2
		die "make $what failed; the whole log is $logf"
	fi
}

build() {
	local flavour=$1
	local key name
	key=$(build_key "$flavour")
	name=asterisk
	[ "$flavour" = upstream ] && name=asterisk-upstream
	[ "$profile" = test ] || name=$name-$profile
	[ -n "$sanitize" ] && name=$name-$sanitize
	local inst=$cache/installs/$key
	if [ -f "$inst/.complete" ]; then
		log "build: $name is cached ($key), nothing to build"
	else
		need_tools gcc g++ make git dpkg-source bzip2 patch pkg-config
		exec 9>"$cache/build.lock"
		flock -w 3600 9 || die "another build holds $cache/build.lock"
		local tree
		tree=$(tree_dir)
		prepare_tree "$tree"
		select_flavour "$tree" "$flavour"
		log "make: building $name (a first build takes 2 to 3 minutes on 2 cores)"
		run_make "$tree" build NOISY_BUILD=
		rm -rf "$inst.tmp"
		log "install: into the cache ($key)"
		run_make "$tree" install install DESTDIR="$inst.tmp" NOISY_BUILD=
		# The configured prefix under DESTDIR is the install root we use.
		source_id > "$inst.tmp$PREFIX/VERSION"
		if [ "$flavour" = patched ]; then
			series_patches > "$inst.tmp$PREFIX/SERIES"
		else
			: > "$inst.tmp$PREFIX/SERIES"
		fi
		touch "$inst.tmp/.complete"
		rm -rf "$inst"
		mv "$inst.tmp" "$inst"
		exec 9>&-
	fi
	mkdir -p "$link_dir"
	ln -sfn "$inst$PREFIX" "$link_dir/$name.new"
	mv -T "$link_dir/$name.new" "$link_dir/$name"
	if [ -n "${ASTERISK_DESTDIR:-}" ]; then
		mkdir -p "$ASTERISK_DESTDIR"
		cp -a "$inst$PREFIX/." "$ASTERISK_DESTDIR/"
	fi
	log "build: $link_dir/$name -> $inst$PREFIX"
}

# Compile the patched chan_websocket.c with the flags of --enable-dev-mode
# (warnings are errors) in the patched tree, without touching the install.
devcheck() {
	local tree
	tree=$(tree_dir)
	[ -f "$tree/.astmarks-configured" ] || build patched
	exec 9>"$cache/build.lock"
	flock -w 3600 9 || die "another build holds $cache/build.lock"
	select_flavour "$tree" patched
	log "devcheck: compiling ${devcheck_objs[*]/%/.c} with dev-mode flags (-Werror)"
	compile_devmode "$tree" "${devcheck_objs[*]/%/.c}"
	log "devcheck: ${devcheck_objs[*]/%/.c} compile cleanly with -Werror and dev-mode warnings"
}

# The files the series changes, which devcheck compiles.
readonly devcheck_objs=(channels/chan_websocket res/res_http_websocket)

# Compile devcheck_objs in the tree $1 as it stands, with dev-mode flags and
# -Werror; stops naming $2 if they do not compile cleanly.
compile_devmode() {
	local tree=$1 what=$2 o rc=0
	for o in "${devcheck_objs[@]}"; do rm -f "$tree/$o.o" "$tree/$o.so"; done
	(cd "$tree" && make channels res AST_DEVMODE=yes ASTCFLAGS=-DAST_DEVMODE=1 NOISY_BUILD=yes) \
		>"$tree/make-devcheck.out" 2>&1 || rc=$?
	# Leave no dev-mode object behind for the normal build to pick up.
	for o in "${devcheck_objs[@]}"; do
		[ $rc -ne 0 ] || [ -f "$tree/$o.so" ] || rc=1
		rm -f "$tree/$o.o" "$tree/$o.so"
	done
	if [ $rc -ne 0 ]; then
		grep -E 'warning|error' "$tree/make-devcheck.out" >&2 || tail -n 40 "$tree/make-devcheck.out" >&2
		die "$what: does not compile cleanly in dev mode; see $tree/make-devcheck.out"
	fi
	grep -q -- '-Werror' "$tree/make-devcheck.out" \
		|| die "$what: devcheck did not compile with -Werror; see $tree/make-devcheck.out"
}

# Each pull request whose tree the series does not build (one that applies
# alone, or one with a version of its own in pulls/ in it or below it)
# compiled on the pristine tree with only what it names, with dev-mode flags. Done once for a set of pull requests:
# a stamp in the cache, keyed by the manifest and the patches, says so.
devcheck_pulls() {
	local tree name own after stamp
	[ -f "$patch_dir/pull-requests" ] || { log "devcheck-pulls: no pull-requests in $patch_dir"; return 0; }
	stamp=$cache/devcheck-pulls-$( (cat "$patch_dir/pull-requests" "$patch_dir"/*.patch \
		"$patch_dir"/pulls/*.patch 2>/dev/null; source_id) | sha256sum | cut -c1-16)
	if [ -f "$stamp" ]; then
		log "devcheck-pulls: these pull requests compiled cleanly before ($stamp)"
		return 0
	fi
	tree=$(tree_dir)
	[ -f "$tree/.astmarks-configured" ] || build patched
	exec 9>"$cache/build.lock"
	flock -w 3600 9 || die "another build holds $cache/build.lock"
	while IFS='|' read -r name own after; do
		[ -z "$after" ] || [[ "$own $after" == */* ]] || continue
		select_flavour "$tree" upstream
		apply_pull_request "$tree" "$own" "$after" "$name"
		compile_devmode "$tree" "pull request $name"
		log "devcheck-pulls: pull request $name ($own${after:+ after $after}) compiles cleanly with -Werror"
	done < <(pull_requests)
	select_flavour "$tree" upstream
	touch "$stamp"
}

main() {
	mkdir -p "$cache"
	local cmd=${1:-build}
	check_source
	# Builds of another source link beside the pinned one's, under its name.
	if [[ $source_kind == @(snapshot|tree) ]] && [ -z "${ASTERISK_INSTALL_LINK:-}" ]; then
		link_dir=$top/build/$version
	fi
	case "$cmd" in
	fetch)
		case "$source_kind" in
		tarball) fetch_tarball >/dev/null ;;
		debian) fetch >/dev/null ;;
		*) log "fetch: nothing to download for a $source_kind" ;;
		esac
		log "fetch: $(source_id) is in $cache/source"
		;;
	check-patches) check_patches ;;
	build) build patched ;;
	build-upstream) build upstream ;;
	devcheck) devcheck ;;
	devcheck-pulls) devcheck_pulls ;;
	pr-series) pr_series "${2:-}" "${3:-}" ;;
	key) build_key "${2:-patched}" ;;
	*) die "unknown command '$cmd' (fetch, check-patches, build, build-upstream, devcheck, devcheck-pulls, pr-series, key)" ;;
	esac
}

main "$@"
