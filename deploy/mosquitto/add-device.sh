#!/usr/bin/env bash
# Give one device (or the fleet server user) a mosquitto password.
#
#   deploy/mosquitto/add-device.sh DEVICE_ID [--passwd FILE] [--password-file FILE] [--out FILE] [--reload]
#
# DEVICE_ID becomes the MQTT username; the ACL (make-acl.sh) keys every device's topics on it.
# The password is read from --password-file, or generated (32 random bytes, base64url) and
# written to --out (mode 0600) for provisioning the box with install-agent.sh --password-file.
# It never appears on a command line (mosquitto_passwd reads it from stdin), so `ps` cannot show it.
# --reload runs `systemctl reload mosquitto` (a SIGHUP) so the new password counts at once.
# Running it again for the same device replaces its password.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

device=""
passwd_file=/etc/mosquitto/toco/passwd
password_file=""
out=""
reload=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --passwd) [[ $# -ge 2 ]] || usage; passwd_file=$2; shift 2 ;;
        --password-file) [[ $# -ge 2 ]] || usage; password_file=$2; shift 2 ;;
        --out) [[ $# -ge 2 ]] || usage; out=$2; shift 2 ;;
        --reload) reload=1; shift ;;
        -h|--help) usage ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $device ]] || die "only one DEVICE_ID, got '$device' and '$1'"; device=$1; shift ;;
    esac
done
[[ -n $device ]] || usage
# Same rule as toco_core.messages.ID_PATTERN: the id is a topic level and an ACL %u.
[[ $device =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] \
    || die "device id '$device' is not usable in MQTT topics: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found: apt-get install mosquitto"

if [[ -n $password_file ]]; then
    [[ -r $password_file ]] || die "cannot read the password file $password_file"
    password=$(head -n 1 -- "$password_file")
    [[ -n $password ]] || die "the password file $password_file is empty"
else
    [[ -n $out ]] || die "no --password-file given: pass --out FILE to receive the generated password"
    password=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
fi
[[ $password != *:* ]] || die "a password may not contain ':' (mosquitto's passwd format)"

mkdir -p -- "$(dirname -- "$passwd_file")"
create=()
[[ -s $passwd_file ]] || create=(-c)
# mosquitto_passwd asks twice and reads both answers from stdin when it is not a terminal.
printf '%s\n%s\n' "$password" "$password" | mosquitto_passwd "${create[@]}" "$passwd_file" "$device" >/dev/null \
    || die "mosquitto_passwd failed for $device in $passwd_file"
# mosquitto drops to its own user and must read the file; nobody else needs to.
if getent group mosquitto >/dev/null && [[ $(id -u) -eq 0 ]]; then
    chgrp mosquitto -- "$passwd_file"
    chmod 0640 -- "$passwd_file"
else
    chmod 0644 -- "$passwd_file"  # hashes only (PBKDF2-SHA512); readable so a non-root broker can load it
fi

if [[ -n $out ]]; then
    (umask 077 && printf '%s\n' "$password" > "$out")
    chmod 0600 -- "$out"
    echo "password for $device written to $out (copy it to the box, then delete it here)"
fi
echo "device $device in $passwd_file"

if [[ $reload -eq 1 ]]; then
    command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto \
        || die "mosquitto is not a running systemd service here: send SIGHUP to your mosquitto process yourself"
    systemctl reload mosquitto
    echo "mosquitto reloaded"
fi
