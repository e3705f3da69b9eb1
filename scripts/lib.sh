# Sourced by the scripts in this directory: makes sure a fresh Debian
# machine has what the project needs, installing it if not.
#   ensure_packages  iproute2, iputils-ping, git, iptables, nftables,
#                    systemd, gcc, libc6-dev (apt-get, as root; iptables and
#                    nftables for the portmap plugin, systemd for
#                    systemd-analyze verify of the unit, gcc and libc6-dev
#                    for the race detector, which needs cgo). No package may
#                    start a service in the root namespace: a policy-rc.d
#                    forbids it while apt-get runs.
#   ensure_promtool  promtool (and prometheus) on PATH, for the tests of the
#                    alert rules: when the machine has none, Debian's
#                    prometheus package is downloaded and unpacked into a
#                    cache directory, never installed (installing it would
#                    enable a Prometheus service on the root namespace).
#   ensure_docker    OVERLAY_DOCKER_ROOT: Debian's docker.io, containerd,
#                    runc and busybox-static downloaded and unpacked into a
#                    cache directory, never installed (installing docker.io
#                    would enable a dockerd on the root namespace); the
#                    tests run dockerd from there, confined to a simulated
#                    host's namespaces.
#   ensure_go        Go >= $GO_MIN on PATH; when the machine has none or an
#                    older one, Debian's golang-go downloads the official
#                    toolchain module ($GO_VERSION) from the Go module proxy.

GO_MIN=1.26
GO_VERSION=1.26.8

apt_install() {
	if [ "$(id -u)" != 0 ]; then
		echo "missing $*: run as root (sudo) so it can be installed with apt-get" >&2
		return 1
	fi
	# Debian's prometheus package would start a Prometheus on port 9090
	# of the root namespace: invoke-rc.d asks policy-rc.d first, and 101
	# means "not allowed".
	local policy=/usr/sbin/policy-rc.d made=
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made=1
	fi
	local rc=0
	DEBIAN_FRONTEND=noninteractive apt-get update -q &&
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" || rc=$?
	[ -z "$made" ] || rm -f "$policy"
	return $rc
}

ensure_packages() {
	local need=()
	command -v ip >/dev/null || need+=(iproute2)
	command -v bridge >/dev/null || need+=(iproute2)
	command -v ping >/dev/null || need+=(iputils-ping)
	command -v git >/dev/null || need+=(git)
	command -v iptables >/dev/null || need+=(iptables)
	command -v nft >/dev/null || need+=(nftables)
	command -v systemd-analyze >/dev/null || need+=(systemd)
	command -v gcc >/dev/null || need+=(gcc)
	[ -e /usr/include/stdlib.h ] || need+=(libc6-dev)
	if [ ${#need[@]} -gt 0 ]; then
		apt_install $(printf '%s\n' "${need[@]}" | sort -u) ca-certificates
	fi
}

# go_ok BIN: BIN exists and is Go $GO_MIN or newer.
go_ok() {
	[ -n "$1" ] && [ -x "$1" ] || return 1
	local v
	v=$(GOTOOLCHAIN=local "$1" env GOVERSION 2>/dev/null) || return 1
	v=${v#go}
	[ "$(printf '%s\n%s\n' "$GO_MIN" "$v" | sort -V | head -n1)" = "$GO_MIN" ]
}

ensure_go() {
	export GOTOOLCHAIN=local
	local g
	for g in "$(command -v go)" /usr/local/go/bin/go; do
		if go_ok "$g"; then
			export PATH="$(dirname "$g"):$PATH"
			return 0
		fi
	done
	local arch cache dir
	arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
	cache=${XDG_CACHE_HOME:-$HOME/.cache}/overlay-go
	dir=$cache/mod/golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-$arch
	if ! go_ok "$dir/bin/go"; then
		command -v go >/dev/null || apt_install golang-go ca-certificates
		echo "fetching Go $GO_VERSION from the Go module proxy" >&2
		(cd "$(mktemp -d)" && GOMODCACHE=$cache/mod GOFLAGS=-modcacherw \
			go mod download "golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-$arch")
		chmod +x "$dir"/bin/* "$dir"/pkg/tool/*/*
	fi
	export PATH="$dir/bin:$PATH"
	go_ok "$dir/bin/go"
}

ensure_promtool() {
	command -v promtool >/dev/null && return 0
	local cache=${XDG_CACHE_HOME:-$HOME/.cache}/overlay-prometheus
	if [ ! -x "$cache/usr/bin/promtool" ]; then
		if [ "$(id -u)" != 0 ]; then
			echo "missing promtool: run as root (sudo) so that Debian's prometheus package can be downloaded" >&2
			return 1
		fi
		mkdir -p "$cache/deb"
		DEBIAN_FRONTEND=noninteractive apt-get update -q
		(cd "$cache/deb" && rm -f prometheus_*.deb && apt-get download -q prometheus) || return 1
		dpkg-deb -x "$cache"/deb/prometheus_*.deb "$cache" || return 1
	fi
	export PATH="$cache/usr/bin:$PATH"
}

ensure_docker() {
	local cache=${XDG_CACHE_HOME:-$HOME/.cache}/overlay-docker
	if [ ! -x "$cache/usr/sbin/dockerd" ] || [ ! -x "$cache/bin/busybox" ]; then
		if [ "$(id -u)" != 0 ]; then
			echo "missing dockerd: run as root (sudo) so that Debian's docker.io package can be downloaded" >&2
			return 1
		fi
		mkdir -p "$cache/deb"
		DEBIAN_FRONTEND=noninteractive apt-get update -q
		(cd "$cache/deb" && rm -f ./*.deb && apt-get download -q docker.io containerd runc busybox-static) || return 1
		local deb
		for deb in "$cache"/deb/*.deb; do
			dpkg-deb -x "$deb" "$cache" || return 1
		done
	fi
	# The libraries dockerd and runc link, which a minimal Debian may
	# lack; libraries only, no service.
	local libs=()
	[ -e /lib/x86_64-linux-gnu/libdevmapper.so.1.02.1 ] || [ -e /usr/lib/x86_64-linux-gnu/libdevmapper.so.1.02.1 ] || libs+=(libdevmapper1.02.1)
	[ -e /lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || libs+=(libseccomp2)
	[ ${#libs[@]} -eq 0 ] || apt_install "${libs[@]}" || return 1
	export OVERLAY_DOCKER_ROOT=$cache
}
