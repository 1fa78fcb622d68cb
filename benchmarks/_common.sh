# Shared by the shell scripts of benchmarks/ (sourced, not run).

# usage: print the script's leading comment block (its help), without the '# ' prefixes
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

# pick_python ROOT: $PYTHON, else ROOT/.venv/bin/python, else python3 (sets PY)
pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
    elif [[ -x "$1/.venv/bin/python" ]]; then PY="$1/.venv/bin/python"
    else PY="python3"; fi
}
