#!/usr/bin/env bash
# Install the TOCO Fleet edge agent on one box: its own venv with ONLY the agent extra (no
# torch), the config, the MQTT credentials and the systemd service. Safe to run again: it
# upgrades the venv in place, keeps the credentials unless new ones are given, backs up a
# config it changes, and restarts the service.
#
#   sudo deploy/install-agent.sh --device-id cam-07 --fleet plant1 \
#        --broker-url mqtts://broker.plant1.example:8883 --ca-file ca.crt \
#        --password-file cam-07.password --public-key fleet-public.pem
#
# Required: --device-id ID, --public-key PEM (the fleet server's Ed25519 key).
# Options:
#   --fleet NAME            fleet name (default: default)
#   --broker-url URL        mqtt://host[:port] or mqtts://host[:port] (default: mqtt://127.0.0.1:1883)
#   --password-file FILE    the device's MQTT password (first line), e.g. from add-device.sh --out
#   --password-stdin        read the password from stdin instead
#   --ca-file PEM           CA bundle for mqtts://, copied next to the config
#   --api-port N            inference API port on loopback (default: 8080)
#   --memory-cap SIZE --storage-cap SIZE --latency-cap DURATION --fidelity-budget FRACTION
#                           budgets of the model this box derives (e.g. 64MB, 2MB, 5ms, 1%)
#   --prefix DIR            the venv (default: /opt/toco-agent; ExecStart is DIR/bin/toco-agent)
#   --etc-dir DIR           config dir (default: /etc/toco)
#   --state-dir DIR         state dir (default: /var/lib/toco-agent)
#   --source DIR|WHEEL      what to install (default: the checkout this script lies in)
#   --python EXE            Python >= 3.11 for the venv (default: python3)
#   --user NAME             service account, created if missing (default: toco)
#   --no-user               no account: files stay owned by the caller (tests; needs --no-systemd)
#   --no-systemd            do not install or start the unit (it is still rendered into the prefix)
#   --no-start              install and enable the unit but do not (re)start it
# The password goes to ETC/agent.credentials (mode 0600, read by systemd as root, handed to the
# agent as TOCO_AGENT_PASSWORD), never into agent.toml.
set -euo pipefail

die() { echo "install-agent: error: $*" >&2; exit 1; }
say() { echo "install-agent: $*"; }
usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
device_id="" fleet="default" broker_url="mqtt://127.0.0.1:1883" password_file="" password_stdin=0
ca_file="" public_key="" api_port=8080 memory_cap="" storage_cap="" latency_cap="" fidelity_budget=""
prefix=/opt/toco-agent etc_dir=/etc/toco state_dir=/var/lib/toco-agent source="$(dirname -- "$here")"
python=python3 user=toco no_user=0 no_systemd=0 no_start=0

need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --device-id) need "$@"; device_id=$2; shift 2 ;;
        --fleet) need "$@"; fleet=$2; shift 2 ;;
        --broker-url) need "$@"; broker_url=$2; shift 2 ;;
        --password-file) need "$@"; password_file=$2; shift 2 ;;
        --password-stdin) password_stdin=1; shift ;;
        --ca-file) need "$@"; ca_file=$2; shift 2 ;;
        --public-key) need "$@"; public_key=$2; shift 2 ;;
        --api-port) need "$@"; api_port=$2; shift 2 ;;
        --memory-cap) need "$@"; memory_cap=$2; shift 2 ;;
        --storage-cap) need "$@"; storage_cap=$2; shift 2 ;;
        --latency-cap) need "$@"; latency_cap=$2; shift 2 ;;
        --fidelity-budget) need "$@"; fidelity_budget=$2; shift 2 ;;
        --prefix) need "$@"; prefix=$2; shift 2 ;;
        --etc-dir) need "$@"; etc_dir=$2; shift 2 ;;
        --state-dir) need "$@"; state_dir=$2; shift 2 ;;
        --source) need "$@"; source=$2; shift 2 ;;
        --python) need "$@"; python=$2; shift 2 ;;
        --user) need "$@"; user=$2; shift 2 ;;
        --no-user) no_user=1; shift ;;
        --no-systemd) no_systemd=1; shift ;;
        --no-start) no_start=1; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# ---- check everything before touching the box ----------------------------------------------
[[ -n $device_id ]] || die "--device-id is required (the MQTT username the broker knows this box by)"
[[ -n $public_key ]] || die "--public-key is required (the fleet server's Ed25519 public key, PEM)"
id_rule="use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
[[ $device_id =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "device id '$device_id' is not usable: $id_rule"
[[ $fleet =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "fleet '$fleet' is not usable: $id_rule"
[[ $broker_url =~ ^mqtts?://[^/]+/?$ ]] || die "broker URL '$broker_url' must look like mqtt://host[:port] or mqtts://host[:port]"
[[ $api_port =~ ^[0-9]+$ && $api_port -le 65535 ]] || die "--api-port '$api_port' is not a port number"
[[ -r $public_key ]] || die "cannot read the public key $public_key"
grep -q -- "-----BEGIN PUBLIC KEY-----" "$public_key" || die "$public_key is not a PEM public key (BEGIN PUBLIC KEY)"
[[ -z $ca_file || -r $ca_file ]] || die "cannot read the CA file $ca_file"
[[ $password_stdin -eq 0 || -z $password_file ]] || die "give --password-file or --password-stdin, not both"
[[ -z $password_file || -r $password_file ]] || die "cannot read the password file $password_file"
for d in "$prefix" "$etc_dir" "$state_dir"; do
    [[ $d == /* ]] || die "paths must be absolute: '$d'"
done
[[ -e $source ]] || die "source '$source' does not exist (a checkout of toco-fleet or a wheel)"
if [[ -d $source ]]; then
    [[ -f $source/pyproject.toml ]] || die "source '$source' has no pyproject.toml: point --source at the toco-fleet checkout"
fi
if [[ $no_user -eq 1 && $no_systemd -eq 0 ]]; then
    die "--no-user needs --no-systemd: the service runs as its own account"
fi
if [[ $(id -u) -ne 0 && ( $no_user -eq 0 || $no_systemd -eq 0 ) ]]; then
    die "run as root (sudo), or use --no-systemd --no-user with paths you can write"
fi
if [[ $no_user -eq 0 ]]; then
    [[ $user =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "user name '$user' is not a valid account name"
fi
command -v "$python" >/dev/null || die "$python not found: apt-get install python3 python3-venv"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is older than 3.11: the agent needs Python >= 3.11"
"$python" -c 'import ensurepip, venv' 2>/dev/null || die "$python cannot create venvs: apt-get install python3-venv"

password=""
if [[ $password_stdin -eq 1 ]]; then
    IFS= read -r password || true
    [[ -n $password ]] || die "--password-stdin: nothing read from stdin"
elif [[ -n $password_file ]]; then
    password=$(head -n 1 -- "$password_file")
    [[ -n $password ]] || die "the password file $password_file is empty"
fi
# systemd's EnvironmentFile reads a single-quoted value literally; these would break out of it.
[[ $password != *"'"* && $password != *\\* ]] || die "the password may not contain a single quote or a backslash"

# ---- account ----------------------------------------------------------------------------------
owner=$(id -un)
group=$(id -gn)
if [[ $no_user -eq 0 ]]; then
    if id -u "$user" >/dev/null 2>&1; then
        say "account $user exists"
    else
        useradd --system --user-group --home-dir "$state_dir" --no-create-home \
            --shell /usr/sbin/nologin --comment "TOCO Fleet agent" "$user" \
            || die "could not create the account $user"
        say "created system account $user"
    fi
    owner=$user
    group=$(id -gn "$user")
fi

# ---- venv with the agent extra only -------------------------------------------------------------
if [[ -x $prefix/bin/python ]] && ! "$prefix/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    die "$prefix/bin/python exists but is not a venv: choose another --prefix"
fi
if [[ ! -x $prefix/bin/python ]]; then
    mkdir -p -- "$prefix"
    "$python" -m venv -- "$prefix" || die "creating the venv in $prefix failed"
    say "created venv $prefix"
else
    say "reusing venv $prefix"
fi

staging=$(mktemp -d)
trap 'rm -rf -- "$staging"' EXIT
if [[ -d $source ]]; then
    # Build from a clean copy: the checkout may hold a dev venv, and the build must not write into it.
    # The copy is a deterministic tar, so its hash tells whether this exact source is installed already.
    tar -C "$source" -cf "$staging/source.tar" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude=./bench/results --exclude=./artifacts --exclude=./.cache . \
        || die "copying $source failed"
    mkdir "$staging/src" && tar -C "$staging/src" -xf "$staging/source.tar"
    source_hash=$(sha256sum < "$staging/source.tar" | cut -d' ' -f1)
    target="$staging/src[agent]"
else
    source_hash=$(sha256sum < "$source" | cut -d' ' -f1)
    target="$(cd -- "$(dirname -- "$source")" && pwd)/$(basename -- "$source")[agent]"
fi
stamp=$prefix/share/toco-agent/source.sha256
if [[ -r $stamp && $(cat -- "$stamp") == "$source_hash" ]]; then
    say "toco-fleet[agent] from this source is installed already"
else
    rm -f -- "$stamp"
    say "installing toco-fleet[agent] from $source (this takes a minute)"
    "$prefix/bin/python" -m pip install --quiet --upgrade "$target" \
        || die "pip could not install the agent from $source (see the pip output above)"
    mkdir -p -- "$(dirname -- "$stamp")"
    echo "$source_hash" > "$stamp"
fi
if "$prefix/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    die "torch is importable in $prefix: the agent extra must not pull torch; check pyproject.toml's base dependencies"
fi
[[ -x $prefix/bin/toco-agent ]] || die "$prefix/bin/toco-agent is missing after the install"
"$prefix/bin/toco-agent" --help >/dev/null || die "$prefix/bin/toco-agent --help fails"
say "agent installed, torch absent"

# ---- config, credentials, key ------------------------------------------------------------------------
mkdir -p -- "$etc_dir"
chmod 0755 -- "$etc_dir"
install -m 0644 -- "$public_key" "$etc_dir/fleet-public.pem"
ca_line=""
if [[ -n $ca_file ]]; then
    install -m 0644 -- "$ca_file" "$etc_dir/broker-ca.pem"
    ca_line="ca_file = \"$etc_dir/broker-ca.pem\""
fi

toml_str() { "$prefix/bin/python" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }
config=$(mktemp "$etc_dir/.agent.toml.XXXXXX")
{
    echo "# TOCO Fleet agent of $device_id, written by install-agent.sh; keys: agent/config.py."
    echo "# TOCO_AGENT_<KEY> variables override it (systemd: $etc_dir/agent.env)."
    echo "# The MQTT password is in $etc_dir/agent.credentials (TOCO_AGENT_PASSWORD)."
    echo "device_id = $(toml_str "$device_id")"
    echo "fleet = $(toml_str "$fleet")"
    echo "broker_url = $(toml_str "$broker_url")"
    echo "username = $(toml_str "$device_id")"
    [[ -z $ca_line ]] || echo "$ca_line"
    echo "public_key = $(toml_str "$etc_dir/fleet-public.pem")"
    echo "state_dir = $(toml_str "$state_dir")"
    echo "api_host = \"127.0.0.1\""
    echo "api_port = $api_port"
    [[ -z $memory_cap ]] || echo "memory_cap = $(toml_str "$memory_cap")"
    [[ -z $storage_cap ]] || echo "storage_cap = $(toml_str "$storage_cap")"
    [[ -z $latency_cap ]] || echo "latency_cap = $(toml_str "$latency_cap")"
    [[ -z $fidelity_budget ]] || echo "fidelity_budget = $(toml_str "$fidelity_budget")"
} > "$config"

credentials=$etc_dir/agent.credentials
if [[ -z $password && ! -e $credentials ]]; then
    say "no password given: the agent will connect without one"
fi
if [[ -n $password || ! -e $credentials ]]; then
    (umask 077 && {
        echo "# MQTT password of $device_id (systemd EnvironmentFile; keep mode 0600, owner root)"
        [[ -z $password ]] || echo "TOCO_AGENT_PASSWORD='$password'"
    } > "$credentials.new")
    chmod 0600 -- "$credentials.new"
    mv -f -- "$credentials.new" "$credentials"
    say "credentials written to $credentials (0600)"
else
    chmod 0600 -- "$credentials"
    say "kept the existing credentials in $credentials"
fi

# Let the agent's own validator judge the config, with the credentials as systemd passes them.
if ! (set -a && . "$credentials" && set +a &&
      "$prefix/bin/python" -c 'import sys; from agent.config import load_config; load_config(sys.argv[1])' "$config") 2>"$staging/check"; then
    rm -f -- "$config"
    die "the agent refuses the config: $(tail -n 1 "$staging/check")"
fi
if [[ -e $etc_dir/agent.toml ]] && cmp -s -- "$config" "$etc_dir/agent.toml"; then
    rm -f -- "$config"
    say "config $etc_dir/agent.toml unchanged"
else
    [[ ! -e $etc_dir/agent.toml ]] || cp -p -- "$etc_dir/agent.toml" "$etc_dir/agent.toml.bak"
    chmod 0640 -- "$config"
    mv -f -- "$config" "$etc_dir/agent.toml"
    say "config written to $etc_dir/agent.toml"
fi
chown "root:$group" -- "$etc_dir/agent.toml" 2>/dev/null || chgrp "$group" -- "$etc_dir/agent.toml"

mkdir -p -- "$state_dir"
chown "$owner:$group" -- "$state_dir"
chmod 0750 -- "$state_dir"

# ---- systemd unit ----------------------------------------------------------------------------------------
unit_src=$here/systemd/toco-agent.service
[[ -r $unit_src ]] || die "the unit template $unit_src is missing"
share=$prefix/share/toco-agent
mkdir -p -- "$share"
[[ ! -r $here/README.md ]] || install -m 0644 -- "$here/README.md" "$share/README.md"
# StateDirectory= can only name a directory under /var/lib; elsewhere the install made it above.
if [[ $state_dir =~ ^/var/lib/([A-Za-z0-9_.-]+)$ ]]; then
    state_rule="s|^StateDirectory=.*|StateDirectory=${BASH_REMATCH[1]}|"
else
    state_rule='/^StateDirectory/d'
fi
sed -e "s|/opt/toco-agent|$prefix|g" -e "s|/etc/toco/|$etc_dir/|g" -e "s|^ReadOnlyPaths=/etc/toco\$|ReadOnlyPaths=$etc_dir|" \
    -e "s|/var/lib/toco-agent|$state_dir|g" -e "s|^User=.*|User=$owner|" -e "s|^Group=.*|Group=$group|" \
    -e "$state_rule" -- "$unit_src" > "$share/toco-agent.service"
chmod 0644 -- "$share/toco-agent.service"
say "unit rendered to $share/toco-agent.service"

if [[ $no_systemd -eq 1 ]]; then
    say "done (--no-systemd): run $prefix/bin/toco-agent run --config $etc_dir/agent.toml"
    exit 0
fi
if ! command -v systemctl >/dev/null || [[ ! -d /run/systemd/system ]]; then
    say "systemd is not running here: unit not installed; start the agent with"
    say "  $prefix/bin/toco-agent run --config $etc_dir/agent.toml"
    exit 0
fi
install -m 0644 -- "$share/toco-agent.service" /etc/systemd/system/toco-agent.service
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /etc/systemd/system/toco-agent.service || die "systemd-analyze rejects the unit"
fi
systemctl daemon-reload
systemctl enable toco-agent.service
if [[ $no_start -eq 1 ]]; then
    say "done: unit enabled, not started (--no-start)"
else
    systemctl restart toco-agent.service
    say "done: toco-agent is running (journalctl -u toco-agent -f)"
fi
