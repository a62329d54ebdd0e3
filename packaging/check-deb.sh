#!/usr/bin/env bash
# Checks ferry's Debian package: what it holds, what lintian says of it, its
# unit, and its maintainer scripts run for real in a scratch Debian root.
# Prints one PASS or FAIL line per check and exits non-zero if any failed.
#
#   bash packaging/check-deb.sh          # builds it first (packaging/build-deb.sh)
#   bash packaging/check-deb.sh DEB      # checks a package built already
#
# Run as root: debootstrap and chroot need it (build as yourself first and give
# the .deb if you like). Needs network access to the Debian mirror this host's
# apt uses, and cargo-deb when it builds. It installs lintian and debootstrap
# with apt-get when they are missing. It is not part of tests/run.sh: it needs
# cargo-deb, and the scratch root takes a minute or more to make.
#
# The scratch root (target/deb-check/root, removed at the end; FERRY_KEEP_ROOT=1
# keeps it) is a minimal Debian of this host's release with systemd and man-db,
# and with nothing of the package's dependencies but what its Depends names, so
# that a missing dependency fails there. In it: dpkg -i, the user, directories
# and modes the postinst makes, systemd-analyze verify of the installed unit,
# the daemon started as ferry with the packaged config until /readyz answers 200
# (in a network namespace of its own: its 127.0.0.1:9465 is not this host's),
# a reinstall that keeps the operator's changes, a removal, a purge, and an
# install after the purge. Not checked: systemd itself starting the unit (no
# systemd runs as PID 1 in a chroot), hence enable --now and the hardening.
set -euo pipefail

cd "$(dirname "$0")/.."
scratch=target/deb-check
failed=0
checks=0

pass() { checks=$((checks + 1)); echo "PASS $1: $2"; }
fail() { checks=$((checks + 1)); failed=$((failed + 1)); echo "FAIL $1: $2"; }
# The end: the count, and the exit status.
finish() {
    echo "check-deb: $((checks - failed)) passed, $failed failed"
    if [ "$failed" -eq 0 ]; then exit 0; else exit 1; fi
}
# A check whose failure leaves nothing for the later ones to check.
fatal() { fail "$1" "$2"; finish; }
elapsed() { echo "$(($(date +%s) - $1)) s"; }

need() {
    local tool=$1 package=$2
    command -v "$tool" >/dev/null && return 0
    echo "check-deb: installing $package" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >&2
}

[ "$(id -u)" -eq 0 ] || { echo "check-deb: run as root (debootstrap, chroot)" >&2; exit 2; }

# --- The package --------------------------------------------------------------
started=$(date +%s)
if [ $# -ge 1 ]; then
    deb=$1
    [ -f "$deb" ] || fatal build "no such file: $deb"
    pass build "given $deb"
else
    log=$(mktemp)
    if deb=$(bash packaging/build-deb.sh 2>"$log" | tail -n 1) && [ -f "$deb" ]; then
        pass build "cargo deb built $deb in $(elapsed "$started")"
    else
        cat "$log" >&2
        fatal build "packaging/build-deb.sh failed (its output above)"
    fi
    rm -f "$log"
fi
deb=$(realpath "$deb")

rm -rf "$scratch/extract"
mkdir -p "$scratch/extract"
dpkg-deb -x "$deb" "$scratch/extract"
root=$(realpath "$scratch")/root
extract=$(realpath "$scratch/extract")

# The subcommands the built binary shows in --help; each gets its own man page.
subcommands=$("$extract/usr/bin/ferry" --help |
    sed -n '/^Commands:/,/^$/s/^  \([a-z][a-z-]*\) .*/\1/p' | grep -vx help || true)
[ -n "$subcommands" ] || fail contents "no subcommand found in ferry --help"

listing=$(dpkg-deb -c "$deb")
echo "$listing" | sed 's/^/  /'
missing=""
for path in ./usr/bin/ferry ./usr/lib/systemd/system/ferry.service ./etc/ferry/ferry.toml \
    ./usr/share/man/man1/ferry.1.gz \
    ./usr/share/bash-completion/completions/ferry ./usr/share/zsh/vendor-completions/_ferry \
    ./usr/share/doc/ferry/README.md ./usr/share/doc/ferry/copyright \
    $(for s in $subcommands; do echo "./usr/share/man/man1/ferry-$s.1.gz"; done); do
    echo "$listing" | awk '{print $NF}' | grep -qxF "$path" || missing="$missing $path"
done
if [ -z "$missing" ]; then
    pass contents "binary, unit, conffile, man pages (ferry and $(echo "$subcommands" | paste -sd, -)), bash and zsh completions"
else
    fail contents "dpkg-deb -c lacks:$missing"
fi
# Modes as shipped: the binary runnable by all, the config readable by none but root
# until the postinst gives it to group ferry.
# dpkg-deb -c shows owners as names or as numbers: root/root and 0/0 are the same.
modes=$(echo "$listing" | awk '$NF == "./usr/bin/ferry" || $NF == "./etc/ferry/ferry.toml" {print $1, $2, $NF}' |
    sed 's|root/root|0/0|')
if echo "$modes" | grep -qx -- '-rwxr-xr-x 0/0 ./usr/bin/ferry' &&
    echo "$modes" | grep -qx -- '-rw-r----- 0/0 ./etc/ferry/ferry.toml'; then
    pass modes "usr/bin/ferry 0755, etc/ferry/ferry.toml 0640, both root's"
else
    fail modes "got: $modes"
fi

conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles 2>/dev/null || true)
if [ "$conffiles" = /etc/ferry/ferry.toml ]; then
    pass conffiles "/etc/ferry/ferry.toml, and nothing else"
else
    fail conffiles "conffiles is: ${conffiles:-(none)}"
fi

# The packaged config is config/ferry.toml with its paths under /var and nothing
# else changed but the header that says where it comes from.
packaged="$extract/etc/ferry/ferry.toml"
changed=$(diff --unchanged-line-format= --old-line-format= --new-line-format='%L' \
    config/ferry.toml "$packaged" || true)
unexpected=$(echo "$changed" | grep -vE \
    '^spool_dir = "/var/spool/ferry" |^state_dir = "/var/lib/ferry" |^url = "file:///var/lib/ferry/regions/[a-z]+/images/"$|^# (ferry.s configuration, installed by the ferry package|source, with the spool, the state and the example destinations under /var)|^$' || true)
if grep -q '^spool_dir = "/var/spool/ferry"' "$packaged" &&
    grep -q '^state_dir = "/var/lib/ferry"' "$packaged" &&
    grep -q '^url = "file:///var/lib/ferry/regions/' "$packaged" &&
    ! grep -qE '= "\./|file://\.' "$packaged" &&
    ! grep -q 'embedded default' "$packaged" &&
    [ -z "$unexpected" ]; then
    pass config "spool /var/spool/ferry, state /var/lib/ferry, destinations under /var/lib/ferry/regions/, the rest as config/ferry.toml"
else
    fail config "packaged ferry.toml: a path not replaced, or other lines changed: ${unexpected:-see $packaged}"
fi

# --- lintian --------------------------------------------------------------------
need lintian lintian
lintian_out=$(lintian --fail-on none "$deb" 2>&1 | grep -v '^running with root privileges' || true)
[ -z "$lintian_out" ] || echo "$lintian_out" | sed 's/^/  /'
errors=$(echo "$lintian_out" | grep -c '^E:' || true)
warnings=$(echo "$lintian_out" | grep -c '^W:' || true)
if [ "$errors" -eq 0 ]; then
    pass lintian "no E:, $warnings W: (listed above; overridden tags and why: packaging/debian/ferry.lintian-overrides)"
else
    fail lintian "$errors E: lines (above)"
fi

# --- The unit, on this host ------------------------------------------------------
# The unit as extracted, its ExecStart= pointed at the extracted binary and man
# pointed at the extracted pages (Documentation=man:...), with this host's
# distribution units only (no local drop-in). systemd-analyze only warns about
# most mistakes, so any line about the unit fails the check.
units="$scratch/units"
rm -rf "$units"
mkdir -p "$units"
sed "s|^ExecStart=/usr/bin/ferry |ExecStart=$extract/usr/bin/ferry |" \
    "$extract/usr/lib/systemd/system/ferry.service" >"$units/ferry.service"
grep -q "^ExecStart=$extract/usr/bin/ferry " "$units/ferry.service" ||
    fail unit-host "ExecStart= of the packaged unit does not name /usr/bin/ferry"
if verify_out=$(MANPATH="$extract/usr/share/man" \
    SYSTEMD_UNIT_PATH="$(realpath "$units"):/usr/lib/systemd/system:/lib/systemd/system" \
    timeout 60 systemd-analyze verify "$units/ferry.service" 2>&1) &&
    ! echo "$verify_out" | grep -q 'ferry.service'; then
    pass unit-host "systemd-analyze verify: no complaint (binary and man pages from the package)"
else
    fail unit-host "systemd-analyze verify: $verify_out"
fi

# --- The scratch root -------------------------------------------------------------
need debootstrap debootstrap
# This host's release, from the mirror its apt uses.
. /etc/os-release
suite=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' |
    awk -v s="$suite" '$2 == s && $3 == "deb" {print $1; exit}')
[ -n "$mirror" ] || fatal root "no apt source for $suite on this host"
# The package's Depends (first of each alternative, versions dropped), so that the
# root has what dpkg -i needs and nothing the package forgot to name.
depends=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/ //g' | grep -v '^$' | paste -sd, -)

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    # A chroot with nothing mounted in it; never remove one with mounts.
    if [ -d "$root" ] && [ -z "${FERRY_KEEP_ROOT:-}" ]; then
        if grep -q " $root" /proc/mounts; then
            echo "check-deb: $root has mounts; left as it is" >&2
        else
            rm -rf "$root"
        fi
    fi
}
trap cleanup EXIT
rm -rf "$root"
started=$(date +%s)
if ! debootstrap --variant=minbase --include="systemd,man-db,$depends" \
    "$suite" "$root" "$mirror" >"$scratch/debootstrap.log" 2>&1; then
    tail -n 20 "$scratch/debootstrap.log" >&2
    fatal root "debootstrap $suite from $mirror failed (log: $scratch/debootstrap.log)"
fi
pass root "debootstrap --variant=minbase $suite + systemd, man-db, $depends in $(elapsed "$started")"

in_root() { chroot "$root" "$@"; }
# Owner, group and mode of a path in the root, as "user:group mode".
owner_mode() { in_root stat -c '%U:%G %a' "$1" 2>/dev/null || echo missing; }

cp "$deb" "$root/tmp/ferry.deb"
if out=$(in_root dpkg -i /tmp/ferry.deb 2>&1); then
    pass install "dpkg -i in the scratch root: preinst, unpack, postinst ran without error"
else
    echo "$out" | sed 's/^/  /'
    fatal install "dpkg -i failed (above)"
fi

user=$(in_root getent passwd ferry || true)
uid=$(echo "$user" | cut -d: -f3)
group_of_user=$(in_root id -gn ferry 2>/dev/null || true)
if [ -n "$user" ] && [ "$uid" -lt 1000 ] && [ "$group_of_user" = ferry ] &&
    [ "$(echo "$user" | cut -d: -f6)" = /var/lib/ferry ] &&
    [ "$(echo "$user" | cut -d: -f7)" = /usr/sbin/nologin ]; then
    pass user "system user ferry (uid $uid), group ferry, home /var/lib/ferry, no login"
else
    fail user "getent passwd ferry: ${user:-none}; its group: ${group_of_user:-none}"
fi

spool=$(owner_mode /var/spool/ferry)
state=$(owner_mode /var/lib/ferry)
config=$(owner_mode /etc/ferry/ferry.toml)
envfile=$(owner_mode /etc/ferry/ferry.env)
if [ "$spool" = "ferry:ferry 750" ] && [ "$state" = "ferry:ferry 750" ] &&
    [ "$config" = "root:ferry 640" ] && [ "$envfile" = "root:root 600" ]; then
    pass dirs "/var/spool/ferry and /var/lib/ferry ferry:ferry 0750; ferry.toml root:ferry 0640; ferry.env root:root 0600"
else
    fail dirs "spool $spool, state $state, ferry.toml $config, ferry.env $envfile"
fi

if in_root dpkg-query -W -f='${Conffiles}\n' ferry | grep -q '^ /etc/ferry/ferry.toml '; then
    pass conffile-registered "dpkg knows /etc/ferry/ferry.toml as a conffile"
else
    fail conffile-registered "dpkg-query shows no conffile /etc/ferry/ferry.toml"
fi

# Neither enabled nor started on install (Cargo.toml says why).
enabled=$(in_root systemctl is-enabled ferry.service 2>&1 || true)
if [ "$enabled" = disabled ]; then
    pass not-enabled "systemctl is-enabled: disabled, until the operator's enable --now"
else
    fail not-enabled "systemctl is-enabled ferry: $enabled"
fi

# The installed unit, where everything it names is at its real path.
if verify_out=$(timeout 60 chroot "$root" systemd-analyze verify ferry.service 2>&1) &&
    ! echo "$verify_out" | grep -q 'ferry.service'; then
    pass unit-root "systemd-analyze verify of the installed unit: /usr/bin/ferry, /bin/kill and man ferry(1) present"
else
    fail unit-root "systemd-analyze verify in the root: $verify_out"
fi

# The daemon as the unit runs it (user ferry, the packaged config), until /readyz
# answers 200: the config loads, and the spool, the state directory and the
# destinations are usable by ferry. Its own network namespace, where only
# loopback exists, so its metrics port is not this host's.
# shellcheck disable=SC2317 # run by the bash that unshare starts
daemon_check() {
    ip link set lo up
    FERRY_LOG=info chroot --userspec=ferry:ferry "$root" \
        /usr/bin/ferry daemon --config /etc/ferry/ferry.toml 2>"$root/tmp/daemon.log" &
    local pid=$! answer="" deadline=$((SECONDS + 30)) waited=0 status=0
    # Never left running, whatever ends this shell.
    trap 'kill -KILL "$pid" 2>/dev/null' EXIT
    trap 'exit 1' TERM INT
    while [ "$SECONDS" -lt "$deadline" ]; do
        if answer=$(exec 2>/dev/null 3<>/dev/tcp/127.0.0.1/9465 &&
            printf 'GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && timeout 2 cat <&3) &&
            echo "$answer" | head -n 1 | grep -q ' 200 '; then
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    # SIGTERM: it stops within daemon.shutdown_timeout_secs (30 s); past 40 s it is killed.
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 400 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" || status=$?
    echo "$answer" | tr -d '\r' | sed -n '1p;$p' | paste -sd' ' - >"$root/tmp/readyz"
    echo "$answer" | head -n 1 | grep -q ' 200 ' && [ "$status" -eq 0 ]
}
export -f daemon_check
export root
if timeout --kill-after=5 90 unshare --net bash -c daemon_check; then
    pass daemon "ferry daemon as ferry with /etc/ferry/ferry.toml: /readyz answered '$(cat "$root/tmp/readyz")', then SIGTERM, exit 0"
else
    sed 's/^/  /' "$root/tmp/daemon.log" >&2 || true
    fail daemon "the daemon did not answer /readyz 200 or did not exit 0 (its log above; /readyz: $(cat "$root/tmp/readyz" 2>/dev/null))"
fi

# A reinstall (dpkg's upgrade path) keeps what the operator changed: the config,
# the credentials, the spool's group and mode, and the user's uid.
in_root sh -c 'echo "# operator was here" >>/etc/ferry/ferry.toml
    echo "AWS_ACCESS_KEY_ID=operator" >>/etc/ferry/ferry.env
    addgroup --system --quiet ferry-producers && chgrp ferry-producers /var/spool/ferry && chmod 2770 /var/spool/ferry'
if out=$(in_root dpkg -i /tmp/ferry.deb 2>&1) &&
    in_root grep -q '^# operator was here' /etc/ferry/ferry.toml &&
    in_root grep -q '^AWS_ACCESS_KEY_ID=operator' /etc/ferry/ferry.env &&
    [ "$(owner_mode /var/spool/ferry)" = "ferry:ferry-producers 2770" ] &&
    [ "$(owner_mode /etc/ferry/ferry.toml)" = "root:ferry 640" ] &&
    [ "$(in_root id -u ferry)" = "$uid" ]; then
    pass reinstall "dpkg -i again: config and credentials edits, spool group and setgid mode, uid $uid all kept"
else
    echo "$out" | sed 's/^/  /'
    fail reinstall "spool $(owner_mode /var/spool/ferry), ferry.toml $(owner_mode /etc/ferry/ferry.toml), uid $(in_root id -u ferry 2>&1)"
fi

if out=$(in_root dpkg -r ferry 2>&1) && [ ! -e "$root/usr/bin/ferry" ] &&
    [ -e "$root/etc/ferry/ferry.toml" ] && in_root getent passwd ferry >/dev/null; then
    pass remove "dpkg -r: binary gone; config and user kept"
else
    echo "$out" | sed 's/^/  /'
    fail remove "after dpkg -r: binary $([ -e "$root/usr/bin/ferry" ] && echo present || echo gone), config $([ -e "$root/etc/ferry/ferry.toml" ] && echo kept || echo gone)"
fi

# A purge removes what the postinst made, but neither a producer's image nor
# the daemon's state (whatever the daemon check above left in it).
echo image >"$root/var/spool/ferry/left.img"
state_before=$(ls -A "$root/var/lib/ferry")
if out=$(in_root dpkg -P ferry 2>&1) && [ ! -e "$root/etc/ferry/ferry.toml" ] &&
    [ ! -e "$root/etc/ferry/ferry.env" ] &&
    ! in_root dpkg-statoverride --list /etc/ferry/ferry.toml >/dev/null &&
    [ -f "$root/var/spool/ferry/left.img" ] && echo "$out" | grep -q '/var/spool/ferry is kept' &&
    { [ -z "$state_before" ] || [ "$(ls -A "$root/var/lib/ferry")" = "$state_before" ]; }; then
    pass purge "dpkg -P: config, credentials and statoverride gone; an image in the spool and the state ($(echo "$state_before" | paste -sd, -)) kept, and said so"
else
    echo "$out" | sed 's/^/  /'
    fail purge "after dpkg -P: ferry.toml $([ -e "$root/etc/ferry/ferry.toml" ] && echo left || echo gone), ferry.env $([ -e "$root/etc/ferry/ferry.env" ] && echo left || echo gone), spool image $([ -f "$root/var/spool/ferry/left.img" ] && echo kept || echo gone), state now: $(ls -A "$root/var/lib/ferry" 2>&1 | paste -sd, -)"
fi

# After a purge, the user and group are left: an install must reuse them.
if out=$(in_root dpkg -i /tmp/ferry.deb 2>&1) && [ "$(in_root id -u ferry)" = "$uid" ] &&
    [ "$(owner_mode /etc/ferry/ferry.toml)" = "root:ferry 640" ]; then
    pass install-after-purge "dpkg -i: the left user (uid $uid) reused, ferry.toml root:ferry 0640 again"
else
    echo "$out" | sed 's/^/  /'
    fail install-after-purge "uid $(in_root id -u ferry 2>&1), ferry.toml $(owner_mode /etc/ferry/ferry.toml)"
fi

finish
