#!/usr/bin/env bash
# brise's first minute: builds brise, fetches the default model on first use, and
# starts `brise serve` with the ledger and learning on. Open the console URL it
# prints: chat, give a thumbs-down with a better answer, and after a few of them
# the server trains a new version, evaluates it, and swaps it in.
usage() {
  cat <<EOF
usage: scripts/chat.sh [MODEL] [--no-learn] [BRISE-SERVE-FLAGS...]
       scripts/chat.sh --terminal [BRISE-RUN-ARGS...]

Builds brise (cargo build --release -p brise-cli) and serves MODEL (default
$default_model, brise's default model) with the ledger and learning on; prints the
console's URL.

  MODEL            another known model (\`brise list\`) or a .gguf file
  --terminal       chat in this terminal instead (\`brise run\`, the rest goes to it)
  --no-learn       serve without learning from feedback
  -h, --help       this help

Every other argument goes to \`brise serve\` (see \`brise serve --help\`), and overrides
this script's own defaults, which are:
  --port 8080 (or \$BRISE_PORT)   --admin-key-file \$BRISE_HOME/admin-key
  --learn --learn-after 5 --learn-check 5 --learn-threads 1
e.g. \`scripts/chat.sh --port 9000 --learn-after 20\`.

The admin key (promote and roll back versions, retention and erasure in the console's
Admin view) is made on first use in \$BRISE_HOME/admin-key (default ~/.brise), readable
by you only, and passed as a file: it never appears on a command line.

Environment: BRISE_HOME, BRISE_PORT; BRISE_BIN=path/to/brise runs that binary
instead of building one.
EOF
}
set -euo pipefail
cd "$(dirname "$0")/.."

# brise's default model (`brise run`'s and `brise serve`'s), read from its source so
# that the two never differ; bench/default_model.py is how it was chosen.
default_model=$(sed -n 's/^pub const DEFAULT_MODEL: &str = "\(.*\)";$/\1/p' crates/brise-cli/src/registry.rs)

die() {
  echo "scripts/chat.sh: $*" >&2
  echo "(scripts/chat.sh --help lists its options)" >&2
  exit 2
}
[ -n "$default_model" ] || die "cannot read DEFAULT_MODEL from crates/brise-cli/src/registry.rs"

# `brise serve`'s flags, read from its source (so the check needs no build and never
# goes stale): "FLAG KIND LONG-FLAG" per line, KIND value, repeatable or bool, short
# forms and aliases too (LONG-FLAG: the name they stand for).
serve_flags() {
  awk '
    /^[[:space:]]*#\[arg\(/ { a = $0; next }
    /^[[:space:]]*pub [a-z_]+:/ {
      if (a == "") next
      name = $2; sub(":", "", name)
      kind = ($3 ~ /^bool/) ? "bool" : ($3 ~ /^Vec/) ? "repeatable" : "value"
      gsub("_", "-", name); long = "--" name
      if (match(a, /long = "[^"]+"/)) long = "--" substr(a, RSTART + 8, RLENGTH - 9)
      else if (a !~ /[(, ]long[,)]/) { a = ""; next }
      print long, kind, long
      if (match(a, /short = .[a-zA-Z]./)) print "-" substr(a, RSTART + 9, 1), kind, long
      if (match(a, /visible_alias = "[^"]+"/)) print "--" substr(a, RSTART + 17, RLENGTH - 18), kind, long
      a = ""
    }' crates/brise-cli/src/serve.rs
}

if [ "${1:-}" = "--terminal" ]; then
  terminal=1
  shift
else
  terminal=0
fi

model=""
learn=1
user=()          # the arguments for `brise serve`, as given
given=" "        # the flags among them
port=${BRISE_PORT:-8080}
host=127.0.0.1
if [ "$terminal" = 0 ]; then
  flags=$(serve_flags)
  [ -n "$flags" ] || die "cannot read brise serve's flags from crates/brise-cli/src/serve.rs"
  while [ $# -gt 0 ]; do
    arg=$1
    shift
    case "$arg" in
      -h|--help) usage; exit 0 ;;
      --terminal) die "--terminal must come first" ;;
      --no-learn) learn=0; continue ;;
      --) user+=("$arg" "$@"); break ;;
      -*)
        flag=${arg%%=*}
        kind="" long=""
        read -r kind long < <(awk -v f="$flag" '$1 == f { print $2, $3; exit }' <<<"$flags") || true
        [ -n "${kind:-}" ] || die "unknown option $flag: neither this script's nor brise serve's"
        flag=$long
        if [ "$kind" != repeatable ]; then
          case " $given " in
            *" $flag "*) die "$flag is given twice (a short and a long form count as one)" ;;
          esac
        fi
        given+="$flag "
        user+=("$arg")
        value=""
        if [ "$kind" != bool ]; then
          if [ "${arg%%=*}" != "$arg" ]; then
            value=${arg#*=}
          else
            [ $# -gt 0 ] || die "$flag needs a value"
            value=$1
            user+=("$1")
            shift
          fi
        elif [ "${arg%%=*}" != "$arg" ]; then
          die "$flag takes no value"
        fi
        case "$flag" in
          --port) port=$value ;;
          --host) host=$value ;;
        esac
        ;;
      *)
        if [ -z "$model" ]; then model=$arg; else user+=("$arg"); fi
        ;;
    esac
  done
  case "$port" in
    ''|*[!0-9]*) die "the port must be a number, not '$port'" ;;
  esac
fi

# Each default of this script, unless the same flag is among the arguments.
has() {
  local f
  for f in "$@"; do
    case " $given " in *" $f "*) return 0 ;; esac
  done
  return 1
}

if [ -n "${BRISE_BIN:-}" ]; then
  [ -x "$BRISE_BIN" ] || die "BRISE_BIN=$BRISE_BIN is not an executable"
  bin=$BRISE_BIN
else
  command -v cargo >/dev/null 2>&1 || { echo "error: cargo is required (install Rust with rustup)" >&2; exit 1; }
  bin=./target/release/brise
  if [ ! -x "$bin" ]; then
    echo "brise: building it first (cargo build --release; the first build compiles about 300 crates," >&2
    echo "       10 to 20 minutes on a 2-core machine, a few on a large one; later runs take seconds)" >&2
  else
    echo "brise: building (only what changed since the last build)" >&2
  fi
  cargo build --release -p brise-cli
fi

if [ "$terminal" = 1 ]; then
  exec "$bin" run "$@"
fi

home=${BRISE_HOME:-$HOME/.brise}
defaults=()
has --port || defaults+=(--port "$port")
if ! has --admin-key --admin-key-file && [ -z "${BRISE_ADMIN_KEY:-}${BRISE_ADMIN_KEY_FILE:-}" ]; then
  mkdir -p "$home"
  if [ ! -s "$home/admin-key" ]; then
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$home/admin-key")
  fi
  defaults+=(--admin-key-file "$home/admin-key")
  keynote=" (admin key in $home/admin-key)"
else
  keynote=""
fi
if [ "$learn" = 1 ]; then
  has --learn || defaults+=(--learn)
  has --learn-after || defaults+=(--learn-after 5)
  has --learn-check || defaults+=(--learn-check 5)
  has --learn-threads || defaults+=(--learn-threads 1)
fi
case "$host" in
  0.0.0.0|::) shown=127.0.0.1 ;;
  *:*) shown="[$host]" ;;
  *) shown=$host ;;
esac
echo "brise: the console will be at http://$shown:$port/$keynote" >&2
exec "$bin" serve "${model:-$default_model}" ${defaults[@]+"${defaults[@]}"} ${user[@]+"${user[@]}"}
