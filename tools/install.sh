#!/usr/bin/env bash
# Install what e2email needs on Debian 12 (or newer) into ./.venv.
#   bash tools/install.sh          gnupg + the package        (enough for `e2email demo`)
#   bash tools/install.sh --test   also the independent verifiers (sqop, gosop, sq, gpgsm,
#                                  openssl) and the test tools (pytest, mypy, ruff)
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# Debian packages: the commands we need, and the package that brings each.
declare -A pkg_of=( [gpg]=gnupg [gpg-agent]=gpg-agent [gpgconf]=gpgconf )
if [ "$want_test" = 1 ]; then
  pkg_of+=( [sqop]=sqop [gosop]=gosop [sq]=sq [gpgsm]=gpgsm [openssl]=openssl )
  # Real mail programs (tests/test_inbound.py, tests/test_sendmail_callers.py).
  pkg_of+=( [neomutt]=neomutt [php]=php-cli [/usr/lib/git-core/git-send-email]=git-email )
  # A real SMTP client for the `e2email relay` tests.
  pkg_of+=( [swaks]=swaks )
  # The broker the Celery delivery tests start on a loopback port (tests/test_celery*.py).
  pkg_of+=( [redis-server]=redis-server )
fi
missing=()
for cmd in "${!pkg_of[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "$want_test" = 1 ]; then
  # git send-email needs Mail::Address, only a Recommends of git-email.
  perl -MMail::Address -e 1 2>/dev/null || missing+=(libmailtools-perl)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install.sh: need root or sudo for: ${missing[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  echo "install.sh: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extra=""
[ "$want_test" = 1 ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
