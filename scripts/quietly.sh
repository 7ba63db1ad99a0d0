# Sourced by the scripts: `quietly LOG CMD...` runs CMD with its output appended to LOG, and only when CMD
# fails prints LOG's last lines, so a working install shows nothing and a broken one shows why.
quietly() {
  local log=$1
  shift
  if ! "$@" >>"$log" 2>&1; then
    echo "failed: $* -- last lines of $log:" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
}
