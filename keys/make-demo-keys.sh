#!/usr/bin/env bash
# Regenerate the demo identities used by `e2email demo`.
# PUBLIC TEST MATERIAL: these secret keys are published in the repository on purpose.
# Never use them for real mail.
# They are written to e2email/demo_keys/, which ships inside the package (the files in keys/
# are links to them), so that an installed `e2email demo` finds them.
set -euo pipefail
cd "$(dirname "$0")/../e2email/demo_keys"
tmp=$(mktemp -d /tmp/e2e-keys.XXXXXX)
trap 'gpgconf --homedir "$tmp" --kill all >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
chmod 700 "$tmp"
make_key() {  # name address file-stem
  gpg --homedir "$tmp" --batch --quiet --gen-key <<PARAMS
Key-Type: EDDSA
Key-Curve: ed25519
Key-Usage: sign
Subkey-Type: ECDH
Subkey-Curve: cv25519
Subkey-Usage: encrypt
Name-Real: $1
Name-Comment: e2email demo key, public test material
Name-Email: $2
Expire-Date: 0
%no-protection
%commit
PARAMS
  gpg --homedir "$tmp" --batch --armor --export "$2" > "$3.pub.asc"
  gpg --homedir "$tmp" --batch --armor --export-secret-keys "$2" > "$3.sec.asc"
}
make_key "Alice Demo" alice@example.org alice
make_key "Bob Demo" bob@example.net bob
echo "wrote alice.{pub,sec}.asc and bob.{pub,sec}.asc in $(pwd)"
