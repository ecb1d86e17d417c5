#!/usr/bin/env bash
# Are the newest releases of what xlsr-jax needs still good? constraints.txt pins the versions the whole
# suite last passed with (README's commands and CI install from it); setup.cfg keeps ranges, so a user
# who installs without constraints gets whatever is newest. This script sees upstream breaks first.
#
#   scripts/check_upstream.sh            newest of everything (no constraints, holds ignored) in a scratch
#                                        venv; lists what differs from constraints.txt; runs the fast tier
#   scripts/check_upstream.sh --update   newest of everything except the holds (constraints.txt lines
#                                        marked "# hold: why"); runs the whole suite; when it passes,
#                                        rewrites constraints.txt from that venv (holds kept, with their why)
#
# torch stays at $UPSTREAM_TORCH (default torch==2.13.0: the CPU wheel; a newer torch from PyPI is a
# CUDA build of several GB, and torch is only the tests' numerical reference). The venv goes in a
# temporary folder and is removed at the end; KEEP_VENV=1 keeps it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
update=0
if [ "${1:-}" = "--update" ]; then update=1; shift; fi
torch_spec=${UPSTREAM_TORCH:-torch==2.13.0}

venv=$(mktemp -d "${TMPDIR:-/tmp}/xlsr-jax-upstream.XXXXXX")
[ "${KEEP_VENV:-0}" = 1 ] || trap 'rm -rf "$venv"' EXIT
trap 'exit 143' INT TERM  # so that the EXIT trap runs when stopped
# What stays put: torch always (an eager upgrade would take the CUDA build), and with --update the holds.
holds="$venv/holds.txt"
echo "$torch_spec" > "$holds"
if [ "$update" = 1 ]; then
  grep -E '^[^#].*#[[:space:]]*hold:' constraints.txt | sed -E 's/[[:space:]]*#.*$//' >> "$holds" || true
fi

python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
echo "check_upstream: holding $(tr '\n' ' ' < "$holds")"
pip install -q --upgrade --upgrade-strategy eager -c "$holds" "$torch_spec" -e ".[test]"
pip install -q --upgrade --no-deps pyctcdecode  # its numpy<2 pin would downgrade jax's numpy

# What a fresh install would get today against what constraints.txt pins (name==version, lowercased).
pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' | sort -f > "$venv/freeze.txt"
echo "check_upstream: newest releases that differ from constraints.txt (pinned -> newest):"
python3 - "$venv/freeze.txt" constraints.txt <<'EOF'
import re, sys
def pins(path):
    out = {}
    for line in open(path, encoding="utf-8"):
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out
new, old = pins(sys.argv[1]), pins(sys.argv[2])
rows = [f"  {n}: {old.get(n, '-')} -> {new.get(n, '-')}" for n in sorted(new.keys() | old.keys())
        if new.get(n) != old.get(n)]
print("\n".join(rows) or "  none")
EOF

# The tests' caches (JAX compilations, decoded audio: ~/.cache/xlsr_jax) in the scratch folder, not yours.
export HOME="$venv/home"
mkdir -p "$HOME"
if [ "$update" = 0 ]; then
  python -m pytest -q -m "not slow" "$@"
  echo "check_upstream: the fast tier passed on the newest releases"
  exit 0
fi
python -m pytest -q "$@"
python3 - "$venv/freeze.txt" constraints.txt "$(python -c 'import platform; print(platform.python_version())')" <<'EOF'
import datetime, re, sys
freeze, target, python = sys.argv[1:]
held = {}
for line in open(target, encoding="utf-8"):
    if not line.startswith("#") and re.search(r"#\s*hold:", line):
        held[re.sub(r"[-_.]+", "-", line.split("==", 1)[0].strip()).lower()] = line.rstrip("\n")
header = f"""\
# The exact versions the whole test suite last passed with. README's two commands (and so CI) install with
# `-c constraints.txt`, so a fresh machine gets what the suite ran with; setup.cfg keeps ranges.
# Written by `scripts/check_upstream.sh --update` on {datetime.date.today()} (Python {python}, CPU torch).
# A line marked "# hold: why" keeps its version through updates until the mark is removed.
"""
lines = []
for line in open(freeze, encoding="utf-8"):
    line = line.strip()
    if not line or line.startswith("#") or "==" not in line:
        continue
    lines.append(held.get(re.sub(r"[-_.]+", "-", line.split("==", 1)[0]).lower(), line))
open(target, "w", encoding="utf-8").write(header + "\n".join(lines) + "\n")
print(f"check_upstream: the whole suite passed; {target} rewritten ({len(lines)} pins, {len(held)} held)")
EOF
